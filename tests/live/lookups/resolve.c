/* The application side of the lookup tests (tests/live_lookups.rs): getaddrinfo for each name
 * given, one after another, or all at once in threads with -c. Built twice: against glibc (gcc)
 * and against musl (musl-gcc -static), so that both C libraries' search-path walks are seen.
 * Prints one line per name: the name, getaddrinfo's result and how long it took. */
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

struct job {
    const char *name;
    int rc;
    long ms;
};

static void *resolve(void *arg)
{
    struct job *j = arg;
    struct addrinfo hints, *res = NULL;
    struct timespec a, b;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    clock_gettime(CLOCK_MONOTONIC, &a);
    j->rc = getaddrinfo(j->name, NULL, &hints, &res);
    clock_gettime(CLOCK_MONOTONIC, &b);
    j->ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
    if (res)
        freeaddrinfo(res);
    return NULL;
}

int main(int argc, char **argv)
{
    int concurrent = argc > 1 && strcmp(argv[1], "-c") == 0;
    int first = concurrent ? 2 : 1;
    struct job jobs[64];
    pthread_t threads[64];
    int n = 0;
    for (int i = first; i < argc && n < 64; i++, n++) {
        jobs[n].name = argv[i];
        if (concurrent)
            pthread_create(&threads[n], NULL, resolve, &jobs[n]);
        else
            resolve(&jobs[n]);
    }
    for (int i = 0; i < n; i++) {
        if (concurrent)
            pthread_join(threads[i], NULL);
        printf("%s rc=%d (%s) ms=%ld\n", jobs[i].name, jobs[i].rc,
               jobs[i].rc ? gai_strerror(jobs[i].rc) : "ok", jobs[i].ms);
    }
    return 0;
}
