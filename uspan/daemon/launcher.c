/* uspan-wg: block SIGINT and SIGTERM, then exec Python on uspan.daemon.launch.
 *
 * A blocked signal stays pending across execve, and Python does not unblock it: a stop
 * signal sent while the interpreter starts (site, .pth files, the entry point's imports)
 * waits until uspan.signals.catch() has installed its handlers and unblocks it, instead
 * of ending the process with a KeyboardInterrupt traceback or killing it outright.
 * USPAN_PYTHON is the interpreter that installed the package (set when this is built).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef USPAN_PYTHON
#error "build with -DUSPAN_PYTHON=\"/path/to/python3\""
#endif

int main(int argc, char **argv) {
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    char **args = calloc((size_t)argc + 4, sizeof *args);
    if (args == NULL) {
        perror("uspan-wg");
        return 1;
    }
    args[0] = USPAN_PYTHON;
    args[1] = "-P";  /* not the working directory first on sys.path */
    args[2] = "-m";
    args[3] = "uspan.daemon.launch";
    for (int i = 1; i < argc; i++)
        args[i + 3] = argv[i];
    execv(USPAN_PYTHON, args);
    fprintf(stderr, "uspan-wg: cannot run %s: %s\n", USPAN_PYTHON, strerror(errno));
    return 127;
}
