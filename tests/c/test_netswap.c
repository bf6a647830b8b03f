/*
 * C tests of libnetswap through include/netswap.h, against a running server.
 *
 *   test_netswap HOST:PORT tests/vectors/requests.json
 *
 * Uses 127.0.0.2 and 127.0.0.3 as two identities (and 127.0.0.4 alone). Prints one line per check that
 * fails and a closing "N passed, N failed" line; exits non-zero on any failure.
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

#define CHECK_RC(expr, want) CHECK((expr) == (want))

static netswap_client *connect_from(const char *addr, const char *local) {
    netswap_options o;
    netswap_options_init(&o);
    o.local_addr = local;
    o.request_timeout_ms = 10000;
    netswap_client *c = NULL;
    netswap_result rc = netswap_connect(addr, &o, &c);
    if (rc != NETSWAP_OK) {
        fprintf(stderr, "cannot connect to %s from %s: %s: %s\n", addr, local,
                netswap_result_name(rc), netswap_last_error());
        exit(2);
    }
    return c;
}

static void test_operations(netswap_client *a, netswap_client *b) {
    netswap_hello_info h;
    CHECK_RC(netswap_hello(a, &h), NETSWAP_OK);
    CHECK(h.protocol == 1);
    CHECK(h.max_record_bytes == 64u * 1024 * 1024);
    netswap_hello_info hb;
    CHECK_RC(netswap_hello(b, &hb), NETSWAP_OK);
    CHECK(memcmp(h.identity, hb.identity, 32) != 0);

    uint64_t p = 0;
    CHECK_RC(netswap_create(a, NETSWAP_ACCESS_READ, (const uint8_t *)"hello world", 11, &p), NETSWAP_OK);
    CHECK(p != 0);

    netswap_buffer *buf = NULL;
    CHECK_RC(netswap_read(b, p, &buf), NETSWAP_OK);
    CHECK(netswap_buffer_len(buf) == 11 && memcmp(netswap_buffer_data(buf), "hello world", 11) == 0);
    netswap_buffer_free(buf);

    CHECK_RC(netswap_read_range(a, p, 6, 100, &buf), NETSWAP_OK);
    CHECK(netswap_buffer_len(buf) == 5 && memcmp(netswap_buffer_data(buf), "world", 5) == 0);
    netswap_buffer_free(buf);

    uint8_t small[4];
    size_t got = 0;
    CHECK_RC(netswap_read_into(a, p, 2, small, sizeof small, &got), NETSWAP_OK);
    CHECK(got == 4 && memcmp(small, "llo ", 4) == 0);

    uint64_t v = 0;
    CHECK_RC(netswap_write_at(a, p, 11, (const uint8_t *)"!", 1, &v), NETSWAP_OK);
    CHECK(v == 2);
    CHECK_RC(netswap_replace(a, p, (const uint8_t *)"v3", 2, &v), NETSWAP_OK);
    CHECK(v == 3);
    CHECK_RC(netswap_replace_if(a, p, 3, (const uint8_t *)"v4", 2, &v), NETSWAP_OK);
    CHECK(v == 4);
    CHECK_RC(netswap_replace_if(a, p, 3, (const uint8_t *)"stale", 5, &v), NETSWAP_CONFLICT);
    CHECK(v == 4); /* the current version */

    netswap_record_info info;
    CHECK_RC(netswap_info(b, p, &info), NETSWAP_OK);
    CHECK(info.size == 2 && info.version == 4 && info.access == NETSWAP_ACCESS_READ && !info.owned);

    /* Permissions and their error codes. */
    CHECK_RC(netswap_replace(b, p, (const uint8_t *)"x", 1, NULL), NETSWAP_ACCESS_VIOLATION);
    CHECK(strstr(netswap_last_error(), "WRITE") != NULL);
    CHECK_RC(netswap_delete(b, p), NETSWAP_ACCESS_VIOLATION);
    CHECK_RC(netswap_read_range(a, p, 3, 1, &buf), NETSWAP_ADDRESS_FAULT);
    CHECK_RC(netswap_read(a, 0x1234, &buf), NETSWAP_ADDRESS_FAULT);
    CHECK(strcmp(netswap_last_error(), "address fault: no such record") == 0);

    /* Ownership. */
    CHECK_RC(netswap_set_access(a, p, NETSWAP_ACCESS_READ | NETSWAP_ACCESS_TAKEOVER), NETSWAP_OK);
    CHECK_RC(netswap_takeover(b, p), NETSWAP_OK);
    CHECK_RC(netswap_info(b, p, &info), NETSWAP_OK);
    CHECK(info.owned && info.access == NETSWAP_ACCESS_READ);
    CHECK_RC(netswap_transfer_to_ip(b, p, "127.0.0.2"), NETSWAP_OK);
    CHECK_RC(netswap_info(a, p, &info), NETSWAP_OK);
    CHECK(info.owned);
    CHECK_RC(netswap_transfer_to_identity(a, p, hb.identity), NETSWAP_OK);
    CHECK_RC(netswap_info(b, p, &info), NETSWAP_OK);
    CHECK(info.owned);
    CHECK_RC(netswap_delete(b, p), NETSWAP_OK);
    CHECK_RC(netswap_info(b, p, &info), NETSWAP_ADDRESS_FAULT);

    /* Invalid arguments are errors, not crashes. */
    CHECK_RC(netswap_create(NULL, 0, NULL, 0, &p), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_create(a, 0, NULL, 5, &p), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_create(a, 0x08, NULL, 0, &p), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_create(a, 0, NULL, 0, NULL), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_read(a, 0, &buf), NETSWAP_INVALID_ARGUMENT);
    CHECK(strstr(netswap_last_error(), "pointer 0") != NULL);
    CHECK_RC(netswap_transfer_to_ip(a, 5, "not an ip"), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_connect(NULL, NULL, NULL), NETSWAP_INVALID_ARGUMENT);
    netswap_client *none = NULL;
    CHECK_RC(netswap_connect("127.0.0.1:1", NULL, &none), NETSWAP_IO);
    CHECK(none == NULL);
    CHECK(strcmp(netswap_result_name(NETSWAP_QUOTA_EXCEEDED), "NETSWAP_QUOTA_EXCEEDED") == 0);
    netswap_buffer_free(NULL);
    netswap_client_free(NULL);
    netswap_watcher_free(NULL);
    CHECK(netswap_buffer_len(NULL) == 0);

    /* An empty record. */
    CHECK_RC(netswap_create(a, 0, NULL, 0, &p), NETSWAP_OK);
    CHECK_RC(netswap_read(a, p, &buf), NETSWAP_OK);
    CHECK(netswap_buffer_len(buf) == 0);
    netswap_buffer_free(buf);
    CHECK_RC(netswap_delete(a, p), NETSWAP_OK);
}

struct events {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int count;
    uint8_t last_event;
    uint64_t last_version;
};

static void on_event(void *user_data, uint8_t event, uint64_t ptr, uint64_t version) {
    (void)ptr;
    struct events *e = user_data;
    pthread_mutex_lock(&e->lock);
    e->count++;
    e->last_event = event;
    e->last_version = version;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
}

static int wait_for(struct events *e, int count) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    pthread_mutex_lock(&e->lock);
    while (e->count < count) {
        if (pthread_cond_timedwait(&e->cond, &e->lock, &until) != 0) break;
    }
    int n = e->count;
    pthread_mutex_unlock(&e->lock);
    return n >= count;
}

static void test_watch(netswap_client *a, netswap_client *b) {
    struct events e = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0};
    uint64_t p = 0;
    CHECK_RC(netswap_create(a, NETSWAP_ACCESS_READ, (const uint8_t *)"x", 1, &p), NETSWAP_OK);
    netswap_watcher *w = NULL;
    CHECK_RC(netswap_watch(b, p, NULL, &e, &w), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_watch(b, p, on_event, &e, &w), NETSWAP_OK);
    CHECK_RC(netswap_replace(a, p, (const uint8_t *)"y", 1, NULL), NETSWAP_OK);
    CHECK(wait_for(&e, 1));
    CHECK(e.last_event == NETSWAP_EVENT_CHANGED && e.last_version == 2);
    CHECK_RC(netswap_set_access(a, p, NETSWAP_ACCESS_READ | NETSWAP_ACCESS_WRITE), NETSWAP_OK);
    CHECK(wait_for(&e, 2));
    CHECK(e.last_event == NETSWAP_EVENT_ACCESS_CHANGED);
    netswap_watcher_free(w);
    /* No callback after netswap_watcher_free() returns. */
    int before = e.count;
    CHECK_RC(netswap_replace(a, p, (const uint8_t *)"z", 1, NULL), NETSWAP_OK);
    struct timespec pause = {0, 100 * 1000 * 1000};
    nanosleep(&pause, NULL);
    CHECK(e.count == before);
    /* Deletion is the last event. */
    CHECK_RC(netswap_watch(b, p, on_event, &e, &w), NETSWAP_OK);
    CHECK_RC(netswap_delete(a, p), NETSWAP_OK);
    CHECK(wait_for(&e, before + 1));
    CHECK(e.last_event == NETSWAP_EVENT_DELETED);
    netswap_watcher_free(w);
}

struct worker {
    netswap_client *client;
    int id;
    int failures;
};

static void *work(void *arg) {
    struct worker *w = arg;
    for (int i = 0; i < 200; i++) {
        char data[32];
        int n = snprintf(data, sizeof data, "thread %d item %d", w->id, i);
        uint64_t p = 0;
        netswap_buffer *buf = NULL;
        if (netswap_create(w->client, 0, (const uint8_t *)data, (size_t)n, &p) != NETSWAP_OK ||
            netswap_read(w->client, p, &buf) != NETSWAP_OK ||
            netswap_buffer_len(buf) != (size_t)n ||
            memcmp(netswap_buffer_data(buf), data, (size_t)n) != 0 ||
            netswap_delete(w->client, p) != NETSWAP_OK) {
            w->failures++;
        }
        netswap_buffer_free(buf);
    }
    return NULL;
}

static void test_threads(netswap_client *a) {
    pthread_t threads[4];
    struct worker workers[4];
    for (int i = 0; i < 4; i++) {
        workers[i] = (struct worker){a, i, 0};
        pthread_create(&threads[i], NULL, work, &workers[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        CHECK(workers[i].failures == 0);
    }
}

/* Every "ptr" in the request vectors parses, and formats back to the same text. */
static void test_vectors(const char *path) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL);
    if (!f) return;
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    int seen = 0;
    for (char *at = strstr(text, "\"ptr\": \""); at; at = strstr(at + 1, "\"ptr\": \"")) {
        char hex[17] = {0};
        memcpy(hex, at + 8, 16);
        uint64_t p = 0;
        CHECK_RC(netswap_pointer_parse(hex, &p), NETSWAP_OK);
        char back[17];
        CHECK_RC(netswap_pointer_format(p, back), NETSWAP_OK);
        CHECK(strcmp(back, hex) == 0);
        seen++;
    }
    CHECK(seen >= 10);
    uint64_t p = 0;
    CHECK_RC(netswap_pointer_parse("0", &p), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_pointer_parse("xyz", &p), NETSWAP_INVALID_ARGUMENT);
    CHECK_RC(netswap_pointer_parse("0x1F", &p), NETSWAP_OK);
    CHECK(p == 0x1f);
}

/* A watch interval over the limit is NETSWAP_MALFORMED with the reason of the test
   vector "watch-interval-over-a-minute" (malformed.json, next to requests.json). */
static void test_watch_vector(netswap_client *a, const char *requests_path) {
    char path[4096];
    snprintf(path, sizeof path, "%s", requests_path);
    char *slash = strrchr(path, '/');
    snprintf(slash ? slash + 1 : path, sizeof path - (size_t)(slash ? slash + 1 - path : 0), "malformed.json");
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL);
    if (!f) return;
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char *at = strstr(text, "\"name\": \"watch-interval-over-a-minute\"");
    CHECK(at != NULL);
    if (!at) return;
    char *payload = strstr(at, "\"payload\": \"") + 12;
    char interval_hex[9] = {0};
    memcpy(interval_hex, payload + 16, 8); /* after the 8-byte pointer */
    uint32_t interval = (uint32_t)strtoul(interval_hex, NULL, 16);
    CHECK(interval == 60001);
    char *reason = strstr(at, "\"reason\": \"") + 11;
    char want[256] = {0};
    memcpy(want, reason, (size_t)(strchr(reason, '"') - reason));

    uint64_t p = 0;
    CHECK_RC(netswap_create(a, NETSWAP_ACCESS_READ, (const uint8_t *)"tick", 4, &p), NETSWAP_OK);
    struct events e = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0};
    netswap_watcher *w = NULL;
    CHECK_RC(netswap_watch_with(a, p, interval, on_event, &e, &w), NETSWAP_MALFORMED);
    CHECK(w == NULL);
    CHECK(strstr(netswap_last_error(), want) != NULL); /* "malformed request: " + the reason */
    CHECK_RC(netswap_watch_with(a, p, interval - 1, on_event, &e, &w), NETSWAP_OK);
    netswap_watcher_free(w);
    CHECK_RC(netswap_delete(a, p), NETSWAP_OK);
}

/* A small receive buffer (options.receive_buffer): a record of a few MB still reads
   back whole. */
static void test_receive_buffer(const char *addr) {
    netswap_options o;
    netswap_options_init(&o);
    CHECK(o.receive_buffer == 0); /* the kernel's autotuning by default */
    o.local_addr = "127.0.0.4";
    o.receive_buffer = 65536;
    netswap_client *c = NULL;
    CHECK_RC(netswap_connect(addr, &o, &c), NETSWAP_OK);
    if (c == NULL) return;
    size_t n = 3000000;
    uint8_t *big = malloc(n);
    for (size_t i = 0; i < n; i++) big[i] = (uint8_t)(i % 253);
    uint64_t p = 0;
    CHECK_RC(netswap_create(c, 0, big, n, &p), NETSWAP_OK);
    netswap_buffer *got = NULL;
    CHECK_RC(netswap_read(c, p, &got), NETSWAP_OK);
    CHECK(got != NULL && netswap_buffer_len(got) == n &&
          memcmp(netswap_buffer_data(got), big, n) == 0);
    netswap_buffer_free(got);
    CHECK_RC(netswap_delete(c, p), NETSWAP_OK);
    free(big);
    netswap_client_free(c);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST:PORT requests.json\n", argv[0]);
        return 2;
    }
    netswap_client *a = connect_from(argv[1], "127.0.0.2");
    netswap_client *b = connect_from(argv[1], "127.0.0.3");
    test_operations(a, b);
    test_watch(a, b);
    test_threads(a);
    test_vectors(argv[2]);
    test_watch_vector(a, argv[2]);
    test_receive_buffer(argv[1]);

    /* A watch still registered when its client is freed: callbacks stop, the
       handle is still freed by the caller. */
    struct events e = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0};
    uint64_t p = 0;
    CHECK_RC(netswap_create(a, NETSWAP_ACCESS_READ, NULL, 0, &p), NETSWAP_OK);
    netswap_watcher *w = NULL;
    CHECK_RC(netswap_watch(b, p, on_event, &e, &w), NETSWAP_OK);
    netswap_client_free(b);
    CHECK_RC(netswap_replace(a, p, (const uint8_t *)"after", 5, NULL), NETSWAP_OK);
    netswap_watcher_free(w);
    CHECK(e.count == 0);
    netswap_client_free(a);

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
