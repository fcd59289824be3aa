/*
 * A deliberately trivial C WebSocket server used only to measure the load generator's own
 * ceiling: it answers every request with a canned reply (request_id echoed), and on
 * /admin/push/broadcast writes one pre-built push frame carrying the same "bseq" to every
 * connection. It parses no JSON beyond that and verifies nothing, so on its own core it can
 * send far faster than the load generator can receive. Loopback only.
 * Usage: ceiling PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;
typedef struct {
    int fd, open, ws;
    buf_t in, out;
} cl_t;

#define MAXC 20100
static cl_t cl[MAXC];
static int epfd;
static volatile sig_atomic_t stop_flag;

static void app(buf_t *b, const void *d, size_t n) {
    if (b->len + n > b->cap) {
        size_t c = b->cap ? b->cap : 1024;
        while (c < b->len + n) c *= 2;
        b->p = realloc(b->p, c);
        if (!b->p) exit(2);
        b->cap = c;
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

static void drop(int fd) {
    if (fd < 0 || fd >= MAXC || !cl[fd].open) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    cl[fd].open = 0;
    cl[fd].in.len = cl[fd].out.len = 0;
}

static void flush(int fd) {
    cl_t *c = &cl[fd];
    while (c->out.len) {
        ssize_t w = write(fd, c->out.p, c->out.len);
        if (w < 0) {
            if (errno == EAGAIN) break;
            drop(fd);
            return;
        }
        memmove(c->out.p, c->out.p + w, c->out.len - (size_t)w);
        c->out.len -= (size_t)w;
    }
    struct epoll_event ev = {.events = EPOLLIN | (c->out.len ? EPOLLOUT : 0), .data.fd = fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}

static void send_text(int fd, const char *s, size_t n) {
    char h[10];
    size_t hl = 2;
    h[0] = (char)0x81;
    if (n < 126) h[1] = (char)n;
    else {
        h[1] = 126;
        h[2] = (char)(n >> 8);
        h[3] = (char)n;
        hl = 4;
    }
    cl_t *c = &cl[fd];
    size_t before = c->out.len;
    app(&c->out, h, hl);
    app(&c->out, s, n);
    if (!before) flush(fd);
}

static void on_text(int fd, char *p, size_t n) {
    char out[512], rid[64] = "null";
    char *q = memmem(p, n, "\"request_id\":", 13);
    if (q) {
        q += 13;
        size_t k = 0;
        while (q < p + n && *q != ',' && *q != '}' && k < sizeof rid - 1) rid[k++] = *q++;
        rid[k] = 0;
    }
    char *b = memmem(p, n, "\"bseq\":", 7);
    if (b && memmem(p, n, "/admin/push/broadcast", 21)) {
        long seq = atol(b + 7);
        int m = snprintf(out, sizeof out,
                         "{\"op\":\"galbot_push\",\"service\":\"broadcast\",\"code\":0,\"msg\":\"\","
                         "\"values\":{\"bseq\":%ld,\"text\":\"fleet-wide notice from the benchmark\"},"
                         "\"result\":true,\"request_id\":\"p-%ld\"}",
                         seq, seq);
        for (int i = 0; i < MAXC; i++)
            if (cl[i].open && cl[i].ws) send_text(i, out, (size_t)m);
    }
    int m = snprintf(out, sizeof out,
                     "{\"op\":\"galbot_response\",\"service\":\"x\",\"code\":0,\"msg\":\"\",\"values\":{},"
                     "\"result\":true,\"request_id\":%s}",
                     rid);
    send_text(fd, out, (size_t)m);
}

static void on_read(int fd) {
    cl_t *c = &cl[fd];
    char tmp[65536];
    ssize_t r = read(fd, tmp, sizeof tmp);
    if (r <= 0) {
        if (r < 0 && errno == EAGAIN) return;
        drop(fd);
        return;
    }
    app(&c->in, tmp, (size_t)r);
    if (!c->ws) {
        char *e = memmem(c->in.p, c->in.len, "\r\n\r\n", 4);
        if (!e) return;
        size_t used = (size_t)(e - c->in.p) + 4;
        memmove(c->in.p, c->in.p + used, c->in.len - used);
        c->in.len -= used;
        c->ws = 1;
        const char *resp = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        app(&c->out, resp, strlen(resp));
        flush(fd);
        if (!cl[fd].open) return;
    }
    size_t off = 0;
    while (c->in.len - off >= 6) {
        uint8_t *h = (uint8_t *)c->in.p + off;
        uint64_t len = h[1] & 0x7f;
        size_t hl = 2;
        if (len == 126) {
            len = (uint64_t)h[2] << 8 | h[3];
            hl = 4;
        } else if (len == 127) {
            drop(fd);
            return;
        }
        hl += 4;
        if (c->in.len - off < hl + len) break;
        uint8_t *mk = h + hl - 4;
        char *pl = (char *)h + hl;
        for (uint64_t k = 0; k < len; k++) pl[k] ^= mk[k & 3];
        int op = h[0] & 15;
        off += hl + len;
        if (op == 8) {
            drop(fd);
            return;
        }
        if (op == 1) on_text(fd, pl, len);
        if (!cl[fd].open) return;
    }
    memmove(c->in.p, c->in.p + off, c->in.len - off);
    c->in.len -= off;
}

static void on_sig(int s) {
    (void)s;
    stop_flag = 1;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 18999;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_sig);
    signal(SIGINT, on_sig);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
        perror("ceiling: bind/listen");
        return 2;
    }
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[512];
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &ev);
    printf("ceiling server listening on ws://127.0.0.1:%d/ws\n", port);
    fflush(stdout);
    while (!stop_flag) {
        int n = epoll_wait(epfd, evs, 512, 100);
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if (c >= MAXC) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    cl[c].fd = c;
                    cl[c].open = 1;
                    cl[c].ws = 0;
                    struct epoll_event e2 = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, c, &e2);
                }
                continue;
            }
            if (evs[k].events & EPOLLOUT) flush(fd);
            if (cl[fd].open && (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_read(fd);
        }
    }
    return 0;
}
