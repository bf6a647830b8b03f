/*
 * C tests of what survives the network, through include/netswap.h: reconnection with
 * its options, watches and mirrors across a server restart, connection state
 * callbacks, deadlines (per client handle), and asynchronous calls with completion
 * callbacks and cancel tokens.
 *
 *   test_resilience SERVER_ADDR SILENT_ADDR
 *
 * SERVER_ADDR is a real server that the harness restarts when this program prints
 * "ready" (changing the shared record while this client is away), answering
 * "restarted <new version>" on stdin. SILENT_ADDR answers HELLO and nothing else.
 * Prints one line per failed check and "N passed, N failed"; exits non-zero on failure.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "netswap.h"

static int passed, failed;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (cond) {                                                                  \
            passed++;                                                                \
        } else {                                                                     \
            failed++;                                                                \
            fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, netswap_last_error());                                    \
        }                                                                            \
    } while (0)

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* What the callbacks saw, under one lock. */
static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;
static int saw_reconnecting, saw_connected_after;
static uint64_t last_changed_version;
static int mirror_reloads;

static void on_state(void *user, netswap_state state, uint32_t attempt, const char *reason) {
    (void)user;
    (void)attempt;
    (void)reason;
    pthread_mutex_lock(&seen_lock);
    if (state == NETSWAP_STATE_RECONNECTING) saw_reconnecting = 1;
    if (state == NETSWAP_STATE_CONNECTED && saw_reconnecting) saw_connected_after = 1;
    pthread_mutex_unlock(&seen_lock);
}

static netswap_result blocking_from_callback = NETSWAP_OK;

static void on_watch(void *user, uint8_t event, uint64_t ptr, uint64_t version) {
    /* A blocking call here would wait for this very thread: it is refused. */
    netswap_record_info info;
    netswap_result rc = netswap_info((const netswap_client *)user, ptr, &info);
    pthread_mutex_lock(&seen_lock);
    blocking_from_callback = rc;
    if (event == NETSWAP_EVENT_CHANGED) last_changed_version = version;
    pthread_mutex_unlock(&seen_lock);
}

static void on_mirror(void *user, uint8_t event, uint64_t version, uint64_t size,
                      const netswap_range *changed, size_t changed_len) {
    (void)user;
    (void)version;
    (void)size;
    (void)changed;
    (void)changed_len;
    pthread_mutex_lock(&seen_lock);
    if (event == NETSWAP_MIRROR_RELOADED) mirror_reloads++;
    pthread_mutex_unlock(&seen_lock);
}

static int wait_for(int *flag, double seconds) {
    double until = now_s() + seconds;
    for (;;) {
        pthread_mutex_lock(&seen_lock);
        int v = *flag;
        pthread_mutex_unlock(&seen_lock);
        if (v || now_s() > until) return v;
        sleep_ms(10);
    }
}

/* A completion that a thread can wait for. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    netswap_result result;
    uint64_t ptr, version;
    char data[64];
    size_t data_len;
} completion;

static void completion_init(completion *c) {
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
}

static void completion_destroy(completion *c) {
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
}

static void on_done(void *user, netswap_result result, const netswap_outcome *o) {
    completion *c = user;
    pthread_mutex_lock(&c->lock);
    c->result = result;
    c->ptr = o->ptr;
    c->version = o->version;
    c->data_len = o->data_len < sizeof c->data ? o->data_len : sizeof c->data;
    if (c->data_len) memcpy(c->data, o->data, c->data_len);
    c->done++;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static netswap_result wait_done(completion *c) {
    pthread_mutex_lock(&c->lock);
    while (!c->done) pthread_cond_wait(&c->cond, &c->lock);
    netswap_result r = c->result;
    pthread_mutex_unlock(&c->lock);
    return r;
}

static void test_async_calls(netswap_client *c) {
    completion k;
    completion_init(&k);
    netswap_call call;
    memset(&call, 0, sizeof call);
    call.op = NETSWAP_OP_CREATE;
    call.access = NETSWAP_ACCESS_READ;
    call.data = (const uint8_t *)"async";
    call.data_len = 5;
    CHECK(netswap_call_async(c, &call, on_done, &k) == NETSWAP_OK);
    CHECK(wait_done(&k) == NETSWAP_OK);
    CHECK(k.ptr != 0);
    uint64_t p = k.ptr;
    completion_destroy(&k);

    completion_init(&k);
    memset(&call, 0, sizeof call);
    call.op = NETSWAP_OP_READ;
    call.ptr = p;
    CHECK(netswap_call_async(c, &call, on_done, &k) == NETSWAP_OK);
    CHECK(wait_done(&k) == NETSWAP_OK);
    CHECK(k.data_len == 5 && memcmp(k.data, "async", 5) == 0);
    completion_destroy(&k);

    /* An error comes through the completion, with its code. */
    completion_init(&k);
    memset(&call, 0, sizeof call);
    call.op = NETSWAP_OP_REPLACE_IF;
    call.ptr = p;
    call.version = 99;
    CHECK(netswap_call_async(c, &call, on_done, &k) == NETSWAP_OK);
    CHECK(wait_done(&k) == NETSWAP_CONFLICT);
    CHECK(k.version == 1);
    completion_destroy(&k);

    /* Bad arguments are refused at once, and the completion is never called. */
    memset(&call, 0, sizeof call);
    call.op = NETSWAP_OP_READ;
    call.ptr = 0;
    CHECK(netswap_call_async(c, &call, on_done, NULL) == NETSWAP_INVALID_ARGUMENT);
    CHECK(netswap_call_async(c, &call, NULL, NULL) == NETSWAP_INVALID_ARGUMENT);
}

static void test_deadlines_and_cancellation(const char *silent) {
    netswap_options o;
    netswap_options_init(&o);
    o.request_timeout_ms = 300;
    o.keepalive_ms = 0;
    netswap_client *c = NULL;
    CHECK(netswap_connect(silent, &o, &c) == NETSWAP_OK);
    if (!c) return;

    /* The default deadline. */
    double t0 = now_s();
    netswap_buffer *buf = NULL;
    CHECK(netswap_read(c, 7, &buf) == NETSWAP_TIMEOUT);
    double took = now_s() - t0;
    CHECK(took >= 0.29 && took < 3.0);
    CHECK(strstr(netswap_last_error(), "READ of 0000000000000007") != NULL);

    /* A handle with its own deadline. */
    netswap_client *quick = NULL;
    CHECK(netswap_client_with_timeout(c, 50, &quick) == NETSWAP_OK);
    t0 = now_s();
    netswap_record_info info;
    CHECK(netswap_info(quick, 7, &info) == NETSWAP_TIMEOUT);
    CHECK(now_s() - t0 < 0.28);
    netswap_client_free(quick); /* the connection stays: `c` still holds it */
    CHECK(netswap_client_state(c, NULL, 0) == NETSWAP_STATE_CONNECTED);

    /* Many cancelled calls complete with NETSWAP_CANCELLED, none hangs. */
    enum { N = 500 };
    static completion k[N];
    netswap_cancel *cancel = netswap_cancel_new();
    netswap_call call;
    memset(&call, 0, sizeof call);
    call.op = NETSWAP_OP_READ;
    call.ptr = 9;
    call.timeout_ms = 60000;
    call.cancel = cancel;
    for (int i = 0; i < N; i++) {
        completion_init(&k[i]);
        CHECK(netswap_call_async(c, &call, on_done, &k[i]) == NETSWAP_OK);
    }
    netswap_cancel_trigger(cancel);
    int cancelled = 0;
    for (int i = 0; i < N; i++) {
        if (wait_done(&k[i]) == NETSWAP_CANCELLED) cancelled++;
        completion_destroy(&k[i]);
    }
    CHECK(cancelled == N);
    netswap_cancel_free(cancel);
    netswap_client_free(c);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: test_resilience SERVER_ADDR SILENT_ADDR\n");
        return 2;
    }
    netswap_options o;
    netswap_options_init(&o);
    o.local_addr = "127.0.0.2";
    o.request_timeout_ms = 10000;
    o.reconnect_initial_delay_ms = 50;
    o.reconnect_max_delay_ms = 300;
    netswap_client *c = NULL;
    if (netswap_connect(argv[1], &o, &c) != NETSWAP_OK) {
        fprintf(stderr, "cannot connect: %s\n", netswap_last_error());
        return 2;
    }
    CHECK(netswap_set_state_callback(c, on_state, NULL) == NETSWAP_OK);
    uint64_t p = 0;
    CHECK(netswap_create(c, NETSWAP_ACCESS_READ | NETSWAP_ACCESS_WRITE, (const uint8_t *)"before", 6, &p) ==
          NETSWAP_OK);
    char hex[17];
    netswap_pointer_format(p, hex);
    netswap_watcher *w = NULL;
    CHECK(netswap_watch_with(c, p, 0, on_watch, c, &w) == NETSWAP_OK);
    netswap_mirror *m = NULL;
    CHECK(netswap_mirror_new(c, p, 0, on_mirror, NULL, &m) == NETSWAP_OK);
    CHECK(netswap_mirror_version(m) == 1);

    /* The harness restarts the server and changes the record while we are away. */
    printf("ready %s\n", hex);
    fflush(stdout);
    unsigned long long changed_to = 0;
    if (scanf("restarted %llu", &changed_to) != 1) {
        fprintf(stderr, "the harness did not answer\n");
        return 2;
    }
    CHECK(wait_for(&saw_connected_after, 10.0));
    /* The watch tells the change made while it was away; the mirror reloads it. */
    double until = now_s() + 10.0;
    for (;;) {
        pthread_mutex_lock(&seen_lock);
        uint64_t v = last_changed_version;
        pthread_mutex_unlock(&seen_lock);
        if (v == changed_to || now_s() > until) break;
        sleep_ms(10);
    }
    pthread_mutex_lock(&seen_lock);
    CHECK(last_changed_version == changed_to);
    CHECK(blocking_from_callback == NETSWAP_INVALID_ARGUMENT);
    pthread_mutex_unlock(&seen_lock);
    CHECK(wait_for(&mirror_reloads, 10.0));
    uint8_t copy[64];
    size_t len = 0;
    uint64_t version = 0;
    CHECK(netswap_mirror_read_into(m, copy, sizeof copy, &len, &version) == NETSWAP_OK);
    CHECK(version == changed_to);
    CHECK(len == 17 && memcmp(copy, "changed meanwhile", 17) == 0);
    netswap_buffer *buf = NULL;
    CHECK(netswap_read(c, p, &buf) == NETSWAP_OK);
    CHECK(buf && netswap_buffer_len(buf) == 17);
    netswap_buffer_free(buf);
    char reason[128];
    CHECK(netswap_client_state(c, reason, sizeof reason) == NETSWAP_STATE_CONNECTED);

    test_async_calls(c);
    netswap_mirror_free(m);
    netswap_watcher_free(w);
    netswap_client_free(c);

    test_deadlines_and_cancellation(argv[2]);

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
