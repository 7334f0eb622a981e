// Guest-side check of pvm-6.1.patch change 3 (SYSCALL completed from the #PF handler):
// return values and errno, ENOSYS, signal delivery on the way out, sigreturn, EINTR,
// SA_RESTART (ip rewound onto the SYSCALL), restart_syscall (ERESTART_RESTARTBLOCK),
// fork/wait, exec, threads. Also passes natively, which is the reference.
//
// Not part of build.sh. To run it in the guest (QEMU or vmm), build it static and put it in a
// test initramfs next to /bin/busybox (the exec check runs it), with an /init that runs it:
//   gcc -O1 -static -pthread -o sctest pvm-syscall-test.c
// Prints one "ok"/"FAIL" line per check and "SCTEST-DONE fails=N"; exit status 0 if all pass.
// Measured: all 13 checks pass with 1 and 2 vCPUs on a PVM host (QEMU 7.2).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static int fails;
#define CHECK(c, ...) do { if (c) printf("ok   " __VA_ARGS__); else { fails++; printf("FAIL " __VA_ARGS__); } printf("\n"); } while (0)
static volatile int hits;
static void on_alarm(int s) { (void)s; hits++; }
static void *thr(void *a) { return (void *)((long)a + 1); }

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    CHECK(syscall(SYS_getpid) == getpid() && getpid() > 0, "getpid %d", getpid());
    long r = syscall(999999);
    CHECK(r == -1 && errno == ENOSYS, "bad nr -> ENOSYS (r=%ld errno=%d)", r, errno);
    r = syscall(-1L);
    CHECK(r == -1 && errno == ENOSYS, "nr -1 -> ENOSYS (r=%ld errno=%d)", r, errno);
    CHECK(open("/nonexistent", O_RDONLY) == -1 && errno == ENOENT, "open missing -> ENOENT");
    void *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED && (unsigned long)p > 0x7f0000000000UL, "mmap high address %p", p);
    memset(p, 1, 1 << 20);
    // signal delivery on exit to user + sigreturn, flags preserved
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sigaction(SIGUSR1, &sa, NULL);
    kill(getpid(), SIGUSR1);
    CHECK(hits == 1, "SIGUSR1 handler ran once (hits=%d)", hits);
    // EINTR without SA_RESTART
    int fds[2];
    pipe(fds);
    sa.sa_flags = 0;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 0}, {0, 200000}};
    setitimer(ITIMER_REAL, &it, NULL);
    char c;
    r = read(fds[0], &c, 1);
    CHECK(r == -1 && errno == EINTR && hits == 2, "blocked read -> EINTR (r=%ld errno=%d hits=%d)", r, errno, hits);
    // SA_RESTART: read restarted after the handler; a child writes 1 byte after 500 ms
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    pid_t pid = fork();
    if (pid == 0) { usleep(600000); write(fds[1], "x", 1); _exit(7); }
    setitimer(ITIMER_REAL, &it, NULL);
    r = read(fds[0], &c, 1);
    CHECK(r == 1 && c == 'x' && hits == 3, "SA_RESTART read restarted (r=%ld c=%c hits=%d)", r, c, hits);
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 7, "fork/wait exit 7 (st=%#x)", st);
    // nanosleep restart via restart_syscall (ERESTART_RESTARTBLOCK)
    setitimer(ITIMER_REAL, &it, NULL);
    struct timeval t0, t1;
    gettimeofday(&t0, NULL);
    struct timespec ts = {0, 500000000};
    r = nanosleep(&ts, &ts);
    gettimeofday(&t1, NULL);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_usec - t0.tv_usec) / 1000;
    CHECK(r == -1 && errno == EINTR && hits == 4 && ms >= 150, "nanosleep EINTR after %ld ms rem=%ld.%09ld", ms, ts.tv_sec, ts.tv_nsec);
    // SIGSTOP/SIGCONT during nanosleep: no handler, so the kernel restarts it through
    // restart_syscall (ERESTART_RESTARTBLOCK, ip rewound by 2); sleeps the full time.
    pid_t parent = getpid();
    pid = fork();
    if (pid == 0) { usleep(100000); kill(parent, SIGSTOP); usleep(100000); kill(parent, SIGCONT); _exit(0); }
    gettimeofday(&t0, NULL);
    ts.tv_sec = 0; ts.tv_nsec = 500000000;
    r = nanosleep(&ts, NULL);
    gettimeofday(&t1, NULL);
    ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_usec - t0.tv_usec) / 1000;
    waitpid(pid, &st, 0);
    CHECK(r == 0 && ms >= 480, "nanosleep across SIGSTOP/SIGCONT restarted, r=%ld %ld ms", r, ms);
    // threads: clone + futex
    pthread_t th; void *ret;
    pthread_create(&th, NULL, thr, (void *)41);
    pthread_join(th, &ret);
    CHECK((long)ret == 42, "pthread join ret=%ld", (long)ret);
    // exec
    pid = fork();
    if (pid == 0) { execl("/bin/busybox", "true", NULL); _exit(99); }
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "fork+exec busybox true (st=%#x)", st);
    printf("SCTEST-DONE fails=%d\n", fails);
    return fails != 0;
}
