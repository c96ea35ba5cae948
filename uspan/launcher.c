/* uspan-wg and uspan: block SIGINT and SIGTERM, then exec NAME-python beside this file.
 *
 * One program installed under two names; NAME is the name of the file it runs from. A
 * blocked signal stays pending across execve, and Python does not unblock it: a stop
 * signal sent while the interpreter starts (site, .pth files, the entry point's imports)
 * waits until uspan.signals.catch() has installed its handlers and unblocks it, instead
 * of ending the process with a KeyboardInterrupt traceback or killing it outright.
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
    char *slash = strrchr(self, '/');
    const char *name = slash == NULL ? self : slash + 1;
    char script[PATH_MAX];
    if ((size_t)size + sizeof SUFFIX > sizeof script) {
        fprintf(stderr, "%s: path too long: %s\n", name, self);
        return 127;
    }
    memcpy(script, self, (size_t)size);
    memcpy(script + size, SUFFIX, sizeof SUFFIX);
    argv[0] = script;
    execv(script, argv);
    fprintf(stderr, "%s: cannot run %s: %s\n", name, script, strerror(errno));
    return 127;
}
