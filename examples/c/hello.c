/* The README's C example: build it from any folder with
 *   cc hello.c $(pkg-config --cflags --libs netswap) -o hello
 * after scripts/install-c.sh PREFIX (set PKG_CONFIG_PATH=PREFIX/lib/pkgconfig). */
#include <stdio.h>
#include <stdlib.h>
#include <netswap.h>

int main(void) {
    const char *server = getenv("NETSWAP_SERVER") ? getenv("NETSWAP_SERVER") : "127.0.0.1:7420";
    netswap_client *c = NULL;
    if (netswap_connect(server, NULL, &c) != NETSWAP_OK) { /* NULL: default options */
        fprintf(stderr, "connect: %s\n", netswap_last_error());
        return 1;
    }
    uint64_t ptr = 0;
    if (netswap_create(c, NETSWAP_ACCESS_READ, (const uint8_t *)"hello", 5, &ptr) != NETSWAP_OK) {
        fprintf(stderr, "create: %s\n", netswap_last_error());
        return 1;
    }
    char hex[17];
    netswap_pointer_format(ptr, hex);
    printf("pointer %s\n", hex); /* give this to others */

    netswap_buffer *buf = NULL;
    if (netswap_read(c, ptr, &buf) == NETSWAP_OK) {
        printf("%.*s\n", (int)netswap_buffer_len(buf), (const char *)netswap_buffer_data(buf));
        netswap_buffer_free(buf); /* library-owned: free it */
    }

    /* A per-call deadline: a second handle on the same connection. */
    netswap_client *quick = NULL;
    netswap_client_with_timeout(c, 200, &quick);
    netswap_record_info info;
    if (netswap_info(quick, ptr, &info) == NETSWAP_OK)
        printf("version %llu, %llu bytes\n", (unsigned long long)info.version, (unsigned long long)info.size);
    netswap_client_free(quick);
    netswap_client_free(c); /* the connection closes with its last handle */
    return 0;
}
