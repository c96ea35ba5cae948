/* uspan-wg: block SIGINT and SIGTERM, then exec uspan-wg-python beside this file.
 *
 * A blocked signal stays pending across execve, and Python does not unblock it: a stop
 * signal sent while the interpreter starts (site, .pth files, the entry point's imports)
 * waits until uspan.signals.catch() has installed its handlers and unblocks it, instead
 * of ending the process with a KeyboardInterrupt traceback or killing it outright.
 * uspan-wg-python is the console script pip writes at install time, with the #! line of
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

#define SCRIPT "uspan-wg-python"

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
            fprintf(stderr, "uspan-wg: cannot find %s: /proc/self/exe: %s\n", SCRIPT,
                    strerror(errno));
            return 127;
        }
        size = (ssize_t)strlen(argv[0]);
        memcpy(self, argv[0], (size_t)size);
    }
    self[size] = '\0';
    char *slash = strrchr(self, '/');
    size_t dir = slash == NULL ? 0 : (size_t)(slash - self) + 1;
    char script[PATH_MAX];
    if (dir + sizeof SCRIPT > sizeof script) {
        fprintf(stderr, "uspan-wg: path too long: %s\n", self);
        return 127;
    }
    memcpy(script, self, dir);
    memcpy(script + dir, SCRIPT, sizeof SCRIPT);
    argv[0] = script;
    execv(script, argv);
    fprintf(stderr, "uspan-wg: cannot run %s: %s\n", script, strerror(errno));
    return 127;
}
