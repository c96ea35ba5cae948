/* uspan-wg and uspan: block SIGINT and SIGTERM, then exec NAME-python beside this file.
 *
 * One program installed under two names; NAME is the name it was run by, else the name
 * of its file. A blocked signal stays pending across execve, and Python does not unblock
 * it: a stop signal sent while the interpreter starts (site, .pth files, the entry
 * point's imports) waits until uspan.signals.catch() has installed its handlers and
 * unblocks it, instead of ending the process with a KeyboardInterrupt traceback or
 * killing it outright.
 * NAME-python is the console script pip writes at install time, with the #! line of
 * the interpreter it installed for: nothing about the build machine is kept here, so a
 * wheel (or pip's cache of one) works in any environment it is installed into.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SUFFIX "-python"

int main(int argc, char **argv) {
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigprocmask(SIG_BLOCK, &stop, NULL);

    char self[PATH_MAX];
    ssize_t size = readlink("/proc/self/exe", self, sizeof self - 1);
    if (size < 0) {  /* no /proc: where we were run from, if a path */
        if (argv[0] == NULL || strchr(argv[0], '/') == NULL ||
            strlen(argv[0]) >= sizeof self) {
            fprintf(stderr, "uspan: cannot find the script to run: /proc/self/exe: %s\n",
                    strerror(errno));
            return 127;
        }
        size = (ssize_t)strlen(argv[0]);
        memcpy(self, argv[0], (size_t)size);
    }
    self[size] = '\0';
    /* NAME: the name it was run by (a link named uspan-wg to a file named uspan, as a
     * packager's de-duplication makes, still runs the daemon), else its file's name. */
    char *slash = strrchr(self, '/');
    size_t dir = slash == NULL ? 0 : (size_t)(slash - self) + 1;
    const char *names[2] = {argv[0] == NULL ? NULL : strrchr(argv[0], '/'), self + dir};
    names[0] = names[0] != NULL ? names[0] + 1 : argv[0];
    char script[PATH_MAX] = "";
    for (int i = 0; i < 2; i++) {
        const char *name = names[i];
        if (name == NULL || *name == '\0') continue;
        size_t length = strlen(name);
        if (dir + length + sizeof SUFFIX > sizeof script) continue;
        memcpy(script, self, dir);
        memcpy(script + dir, name, length);
        memcpy(script + dir + length, SUFFIX, sizeof SUFFIX);
        argv[0] = script;
        execv(script, argv);
    }
    fprintf(stderr, "%s: cannot run %s: %s\n", self + dir, script, strerror(errno));
    return 127;
}
