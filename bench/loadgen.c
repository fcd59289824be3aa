/*
 * fleetpush benchmark load generator: one epoll thread, many non-blocking WebSocket client
 * connections (RFC 6455 client framing with masking; fragmented and control frames parsed).
 *
 * It opens N device connections plus one control (ops) connection, logs each in with a
 * pre-built frame (from --logins, lines "sn<TAB>frame"; from --control-login), then runs the
 * phases named by --phases in order on the same connections. The control connection goes to
 * --control-port when given (another node of a cluster: cross-node broadcast), else to --port.
 *
 *
 *   idle       hold all connections; reads the server's VmRSS before and after (--server-pid)
 *   broadcast  single-broadcast send->last-receipt latency, then deliveries/s with a window
 *   reqresp    closed-loop replies/s, then latency at half that rate (open loop)
 *   command    HTTP POST a command -> device gets push device_command -> device acks
 *   ingest     every device reports once per second; the subscribed control connection
 *              measures report->push latency from a timestamp carried in the report's extra
 *              (last by default: a server that falls behind here leaves a backlog)
 *
 * Prints one JSON line of results on stdout; progress goes to stderr. Loopback only; every
 * phase is bounded in time, and --max-s bounds the whole run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

enum { C_FREE, C_CONNECTING, C_HANDSHAKE, C_LOGIN, C_READY, C_DEAD };
enum { R_DEVICE, R_CONTROL, R_HTTP };

typedef struct {
    int fd;
    uint8_t state, role, msg_op, in_frag, want_out, cmd_wait;
    buf_t in, msg, out;
    int64_t t_start, cmd_t0;
    int outstanding;
} conn_t;

typedef struct {
    int64_t t_send, t_last;
    int count;
} bcast_t;

typedef struct {
    uint32_t *v;
    size_t n, cap;
} samples_t;

enum { PH_CONNECT, PH_IDLE, PH_BCAST_LAT, PH_BCAST_SAT, PH_REQ_SAT, PH_REQ_HALF, PH_INGEST_SUB, PH_INGEST,
       PH_COMMAND, PH_DONE };

/* ---- configuration ---- */
static const char *o_host = "127.0.0.1";
static int o_port = 8765, o_http_port = 0, o_control_port = 0; /* control: --port unless set */
static const char *o_path = "/ws";
static int o_conns = 100, o_concurrency = 256;
static const char *o_logins = NULL, *o_control_login = NULL, *o_http_auth = "";
static const char *o_phases = "idle,broadcast,reqresp,command,ingest";
static double o_idle_s = 2, o_bcast_lat_s = 5, o_bcast_sat_s = 5, o_req_s = 5, o_ingest_s = 5, o_cmd_s = 5;
static int o_bcast_count = 20, o_bcast_window = 4, o_cmd_rate = 100, o_server_pid = 0;
static double o_max_s = 600, o_connect_s = 120, o_drain_s = 3;
static const char *o_bcast_frame =
    "{\"op\":\"galbot_request\",\"service\":\"/admin/push/broadcast\",\"request_id\":\"b@SEQ@\","
    "\"values\":{\"message\":{\"bseq\":@SEQ@,\"text\":\"fleet-wide notice from the benchmark\"}}}";
static const char *o_req_frame =
    "{\"op\":\"galbot_request\",\"service\":\"/api/device/heartbeat\",\"request_id\":@TS@,\"values\":{}}";
static const char *o_status_frame =
    "{\"op\":\"galbot_request\",\"service\":\"/api/device/status\",\"request_id\":@SEQ@,"
    "\"values\":{\"battery\":80,\"location_code\":1,\"extra\":{\"t_us\":@TS@}}}";
static const char *o_sub_frame =
    "{\"op\":\"galbot_request\",\"service\":\"/admin/device/subscribe\",\"request_id\":\"sub\",\"values\":{}}";
static const char *o_ack_frame =
    "{\"op\":\"galbot_request\",\"service\":\"/api/command/ack\",\"request_id\":\"ack-@SEQ@\","
    "\"values\":{\"command_id\":\"@CMD@\",\"ok\":true,\"code\":0,\"msg\":\"\",\"values\":{}}}";
static const char *o_cmd_body = "{\"command\":\"bench\",\"args\":{},\"ttl_s\":60}";

/* ---- state ---- */
static conn_t *conns;
static int n_total; /* devices + control */
static int ctl_idx, http_idx;
static char **sns, **login_frames;
static int epfd;
static struct sockaddr_in srv_addr, http_addr, ctl_addr;
static int64_t t_now, t_begin;
static volatile sig_atomic_t stop_flag;
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static char scratch[1 << 18];
static char tx[1 << 17];
static char tmpl[1 << 16];

static int phase_list[16], n_phases, phase_pos = -1, phase = PH_CONNECT;
static int64_t ph_t0, ph_end, ph_drain_end;
static bool ph_draining;

/* connect */
static int next_open, inflight, n_ready, n_failed, n_devices_ready;
static int64_t connect_t0, connect_t1;
static samples_t s_connect;

/* counters */
static uint64_t frames_rx, bytes_rx, frames_tx, pings_rx, login_fail, closed_by_server, proto_err;
static int close_codes[16][2], n_close_codes;
static long rss_before_kb = -1, rss_after_kb = -1;
static int control_close_code;

/* broadcast */
#define MAX_BCAST (1 << 18)
#define BCAST_WARMUP 3
static bcast_t *bc;
static int bc_next;
static uint64_t bc_deliveries_sat, bc_replies, bc_reply_err, bc_expected_sat, bc_received_sat;
static int bc_lat_first, bc_sat_first;
static samples_t s_bc_lat, s_bc_sat_lat;
static double bc_sat_elapsed;

/* reqresp */
static uint64_t rq_sent, rq_replies, rq_err, rq_sat_replies, rq_half_sent, rq_half_replies;
static int64_t rq_seq;
static double rq_sat_rate, rq_half_rate, rq_sat_elapsed, rq_half_elapsed;
static int rq_rr;
static samples_t s_rq_sat, s_rq_half;

/* ingest */
static uint64_t in_sent, in_ok, in_err, in_push, in_target;
static samples_t s_ingest;
static double in_elapsed;
static bool sub_ok;

/* command */
static uint64_t cm_posted, cm_http_ok, cm_http_err, cm_pushes, cm_dups, cm_acked, cm_ack_err, cm_skipped;
static int cm_rr;
static bool http_busy;
static int64_t http_t0;
static samples_t s_cmd, s_http;
static double cm_elapsed;

/* per-phase CPU */
static double cpu_at(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}
static double bc_cpu0, bc_cpu_sat;
static uint64_t bc_rx0, bc_rx_sat;

static int64_t mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static uint32_t rnd32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

static void die(const char *m) {
    fprintf(stderr, "loadgen: %s: %s\n", m, strerror(errno));
    exit(2);
}

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t nc = b->cap ? b->cap : 512;
    while (nc < b->len + extra) nc *= 2;
    char *np = realloc(b->p, nc);
    if (!np) die("realloc");
    b->p = np;
    b->cap = nc;
}
static void buf_append(buf_t *b, const void *d, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, d, n);
    b->len += n;
}
static void buf_consume(buf_t *b, size_t n) {
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}
static void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static void sample(samples_t *s, int64_t us) {
    if (us < 0) us = 0;
    if (us > UINT32_MAX) us = UINT32_MAX;
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->v = realloc(s->v, s->cap * sizeof(uint32_t));
        if (!s->v) die("realloc");
    }
    s->v[s->n++] = (uint32_t)us;
}
static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}
static double pct_ms(samples_t *s, double p) {
    if (!s->n) return -1;
    size_t i = (size_t)(p * s->n + 0.999999);
    if (i < 1) i = 1;
    if (i > s->n) i = s->n;
    return s->v[i - 1] / 1000.0;
}

/* Expand @SEQ@, @TS@ and @CMD@ in a frame template. */
static size_t expand(const char *t, int64_t seq, int64_t ts, const char *cmd, char *out, size_t cap) {
    size_t o = 0;
    while (*t && o + 64 < cap) {
        if (t[0] == '@') {
            if (!strncmp(t, "@SEQ@", 5)) {
                o += snprintf(out + o, cap - o, "%lld", (long long)seq);
                t += 5;
                continue;
            }
            if (!strncmp(t, "@TS@", 4)) {
                o += snprintf(out + o, cap - o, "%lld", (long long)ts);
                t += 4;
                continue;
            }
            if (!strncmp(t, "@CMD@", 5)) {
                size_t l = strlen(cmd);
                if (o + l + 64 >= cap) break;
                memcpy(out + o, cmd, l);
                o += l;
                t += 5;
                continue;
            }
        }
        out[o++] = *t++;
    }
    out[o] = 0;
    return o;
}

/* ---- JSON scraping (the frames we look at are small; a substring scan is enough) ---- */
static const char *find_val(const char *p, size_t n, const char *key) {
    size_t kl = strlen(key);
    const char *q = memmem(p, n, key, kl);
    if (!q) return NULL;
    q += kl;
    const char *e = p + n;
    while (q < e && (*q == ' ' || *q == ':' || *q == '\t' || *q == '\n' || *q == '\r')) q++;
    return q < e ? q : NULL;
}
static bool find_int(const char *p, size_t n, const char *key, int64_t *out) {
    const char *q = find_val(p, n, key);
    if (!q) return false;
    const char *e = p + n;
    bool neg = false;
    if (*q == '-') {
        neg = true;
        q++;
    }
    if (q >= e || *q < '0' || *q > '9') return false;
    int64_t v = 0;
    while (q < e && *q >= '0' && *q <= '9') v = v * 10 + (*q++ - '0');
    *out = neg ? -v : v;
    return true;
}
static bool find_str(const char *p, size_t n, const char *key, char *out, size_t cap) {
    const char *q = find_val(p, n, key);
    if (!q || *q != '"') return false;
    q++;
    const char *e = p + n;
    size_t o = 0;
    while (q < e && *q != '"' && o + 1 < cap) out[o++] = *q++;
    out[o] = 0;
    return q < e && *q == '"';
}
static inline bool has(const char *p, size_t n, const char *s) { return memmem(p, n, s, strlen(s)) != NULL; }

/* ---- sockets ---- */
static void ep_mod(int i, bool out) {
    conn_t *c = &conns[i];
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = (uint32_t)i};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->want_out = out;
}

static void conn_close(int i, bool rst) {
    conn_t *c = &conns[i];
    if (c->fd >= 0) {
        if (rst) {
            struct linger lg = {1, 0};
            setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    if (c->role == R_HTTP) {
        http_busy = false;
    } else if (c->state == C_CONNECTING || c->state == C_HANDSHAKE || c->state == C_LOGIN) {
        inflight--;
        n_failed++;
    } else if (c->state == C_READY && c->role == R_DEVICE) {
        n_devices_ready--;
    }
    c->state = C_DEAD;
    buf_free(&c->in);
    buf_free(&c->msg);
    buf_free(&c->out);
}

static void raw_send(int i, const char *d, size_t n) {
    conn_t *c = &conns[i];
    if (c->fd < 0) return;
    if (c->out.len) {
        buf_append(&c->out, d, n);
        return;
    }
    ssize_t w = write(c->fd, d, n);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            conn_close(i, false);
            return;
        }
        w = 0;
    }
    if ((size_t)w < n) {
        buf_append(&c->out, d + w, n - w);
        ep_mod(i, true);
    }
}

static void flush_out(int i) {
    conn_t *c = &conns[i];
    while (c->out.len) {
        ssize_t w = write(c->fd, c->out.p, c->out.len);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            conn_close(i, false);
            return;
        }
        buf_consume(&c->out, (size_t)w);
    }
    ep_mod(i, false);
}

/* Send one masked client frame. */
static void ws_send(int i, int opcode, const char *payload, size_t n) {
    size_t h = 0;
    if (n + 14 > sizeof tx) return;
    tx[h++] = (char)(0x80 | opcode);
    if (n < 126) {
        tx[h++] = (char)(0x80 | n);
    } else if (n < 65536) {
        tx[h++] = (char)(0x80 | 126);
        tx[h++] = (char)(n >> 8);
        tx[h++] = (char)n;
    } else {
        tx[h++] = (char)(0x80 | 127);
        for (int k = 7; k >= 0; k--) tx[h++] = (char)((uint64_t)n >> (8 * k));
    }
    uint32_t key = rnd32();
    uint8_t mk[4];
    memcpy(mk, &key, 4);
    memcpy(tx + h, mk, 4);
    h += 4;
    for (size_t k = 0; k < n; k++) tx[h + k] = (char)(payload[k] ^ mk[k & 3]);
    frames_tx++;
    raw_send(i, tx, h + n);
}
static void ws_text(int i, const char *s, size_t n) { ws_send(i, 1, s, n); }

static void open_conn(int i) {
    conn_t *c = &conns[i];
    bool http = c->role == R_HTTP;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "loadgen: socket: %s\n", strerror(errno));
        c->state = C_DEAD;
        n_failed++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = C_CONNECTING;
    c->t_start = t_now;
    if (!http) inflight++;
    struct sockaddr_in *a = http ? &http_addr : c->role == R_CONTROL ? &ctl_addr : &srv_addr;
    if (connect(fd, (struct sockaddr *)a, sizeof *a) < 0 && errno != EINPROGRESS) {
        fprintf(stderr, "loadgen: connect: %s\n", strerror(errno));
        conn_close(i, false);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
    c->want_out = 1;
}

static void send_handshake(int i) {
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     "User-Agent: fleetpush-loadgen\r\n\r\n",
                     o_path, o_host, conns[i].role == R_CONTROL && o_control_port ? o_control_port : o_port);
    conns[i].state = C_HANDSHAKE;
    raw_send(i, req, (size_t)n);
}

/* ---- phases ---- */
static const char *phase_name(int p) {
    switch (p) {
    case PH_CONNECT: return "connect";
    case PH_IDLE: return "idle";
    case PH_BCAST_LAT: return "broadcast-latency";
    case PH_BCAST_SAT: return "broadcast-saturation";
    case PH_REQ_SAT: return "reqresp-saturation";
    case PH_REQ_HALF: return "reqresp-half";
    case PH_INGEST_SUB: return "ingest-subscribe";
    case PH_INGEST: return "ingest";
    case PH_COMMAND: return "command";
    default: return "done";
    }
}

static long read_rss_kb(void) {
    if (o_server_pid <= 0) return -1;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", o_server_pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = atol(line + 6);
    fclose(f);
    return kb;
}

static void enter_phase(int p);
static const char *phase_name(int p);

static void next_phase(void) {
    phase_pos++;
    enter_phase(phase_pos < n_phases ? phase_list[phase_pos] : PH_DONE);
}

static void send_broadcast(void) {
    if (bc_next >= MAX_BCAST || conns[ctl_idx].state != C_READY) return;
    int s = bc_next++;
    bc[s].t_send = t_now;
    bc[s].count = 0;
    bc[s].t_last = 0;
    size_t n = expand(o_bcast_frame, s, t_now, "", tmpl, sizeof tmpl);
    ws_text(ctl_idx, tmpl, n);
}

static void send_request(int i) {
    size_t n = expand(o_req_frame, rq_seq++, mono_us(), "", tmpl, sizeof tmpl);
    conns[i].outstanding++;
    rq_sent++;
    ws_text(i, tmpl, n);
}

static void enter_phase(int p) {
    bool needs_control = p == PH_BCAST_LAT || p == PH_BCAST_SAT || p == PH_INGEST_SUB || p == PH_INGEST;
    if (needs_control && conns[ctl_idx].state != C_READY) {
        fprintf(stderr, "loadgen: phase %s needs the control connection; skipped\n", phase_name(p));
        phase = p;
        next_phase();
        return;
    }
    phase = p;
    ph_t0 = t_now;
    ph_draining = false;
    fprintf(stderr, "loadgen: phase %s at %.2fs (%d devices ready)\n", phase_name(p), (t_now - t_begin) / 1e6,
            n_devices_ready);
    switch (p) {
    case PH_IDLE:
        fprintf(stderr, "{\"event\":\"ready\",\"devices\":%d}\n", n_devices_ready);
        ph_end = t_now + (int64_t)(o_idle_s * 1e6);
        break;
    case PH_BCAST_LAT:
        bc_lat_first = bc_next;
        ph_end = t_now + (int64_t)(o_bcast_lat_s * 1e6);
        send_broadcast();
        break;
    case PH_BCAST_SAT:
        bc_sat_first = bc_next;
        bc_cpu0 = cpu_at();
        bc_rx0 = frames_rx;
        ph_end = t_now + (int64_t)(o_bcast_sat_s * 1e6);
        for (int k = 0; k < o_bcast_window; k++) send_broadcast();
        break;
    case PH_REQ_SAT:
        ph_end = t_now + (int64_t)(o_req_s * 1e6);
        for (int i = 0; i < o_conns; i++)
            if (conns[i].state == C_READY) send_request(i);
        break;
    case PH_REQ_HALF:
        rq_half_rate = rq_sat_rate / 2;
        if (rq_half_rate < 1) rq_half_rate = 1;
        ph_end = t_now + (int64_t)(o_req_s * 1e6);
        break;
    case PH_INGEST_SUB: {
        size_t n = expand(o_sub_frame, 0, 0, "", tmpl, sizeof tmpl);
        ph_end = t_now + 10 * 1000000LL;
        ws_text(ctl_idx, tmpl, n);
        break;
    }
    case PH_INGEST:
        in_target = (uint64_t)n_devices_ready * (uint64_t)(o_ingest_s + 0.5);
        ph_end = t_now + (int64_t)(o_ingest_s * 1e6);
        break;
    case PH_COMMAND:
        if (!o_http_port) {
            fprintf(stderr, "loadgen: command phase needs --http-port; skipped\n");
            next_phase();
            return;
        }
        conns[http_idx].role = R_HTTP;
        open_conn(http_idx);
        ph_end = t_now + (int64_t)(o_cmd_s * 1e6);
        break;
    default:
        break;
    }
}

static void finish_phase(void) {
    switch (phase) {
    case PH_IDLE: rss_after_kb = read_rss_kb(); break;
    case PH_BCAST_SAT: break;
    case PH_REQ_SAT: break;
    default: break;
    }
    next_phase();
}

/* Start the drain part of a phase: no new load, wait for what is in flight (bounded). */
static void start_drain(void) {
    ph_draining = true;
    ph_drain_end = t_now + (int64_t)(o_drain_s * 1e6);
    switch (phase) {
    case PH_BCAST_SAT:
        bc_sat_elapsed = (t_now - ph_t0) / 1e6;
        bc_cpu_sat = cpu_at() - bc_cpu0;
        bc_rx_sat = frames_rx - bc_rx0;
        break;
    case PH_REQ_SAT:
        rq_sat_elapsed = (t_now - ph_t0) / 1e6;
        rq_sat_rate = rq_sat_replies / (rq_sat_elapsed > 0 ? rq_sat_elapsed : 1);
        break;
    case PH_REQ_HALF: rq_half_elapsed = (t_now - ph_t0) / 1e6; break;
    case PH_INGEST: in_elapsed = (t_now - ph_t0) / 1e6; break;
    case PH_COMMAND: cm_elapsed = (t_now - ph_t0) / 1e6; break;
    default: break;
    }
}

static int bc_open(void) {
    int open = 0;
    for (int s = bc_sat_first; s < bc_next; s++)
        if (bc[s].count < n_devices_ready && t_now - bc[s].t_send < 5000000) open++;
    return open;
}

static bool drained(void) {
    switch (phase) {
    case PH_BCAST_LAT:
    case PH_BCAST_SAT: {
        int first = phase == PH_BCAST_LAT ? bc_lat_first : bc_sat_first;
        for (int s = first; s < bc_next; s++)
            if (bc[s].count < n_devices_ready && t_now - bc[s].t_send < 5000000) return false;
        return true;
    }
    case PH_REQ_SAT:
    case PH_REQ_HALF:
        for (int i = 0; i < o_conns; i++)
            if (conns[i].state == C_READY && conns[i].outstanding > 0) return false;
        return true;
    case PH_INGEST: return in_push >= in_ok + in_err && in_ok + in_err >= in_sent;
    case PH_COMMAND:
        if (http_busy) return false;
        for (int i = 0; i < o_conns; i++)
            if (conns[i].state == C_READY && conns[i].cmd_wait) return false;
        return true;
    default: return true;
    }
}

static void http_post(void) {
    /* Next ready device without a command in flight, round robin. */
    int i = -1;
    for (int k = 0; k < o_conns; k++) {
        int j = (cm_rr + k) % o_conns;
        if (conns[j].state == C_READY && !conns[j].cmd_wait) {
            i = j;
            break;
        }
    }
    if (i < 0) {
        cm_skipped++;
        return;
    }
    cm_rr = i + 1;
    char req[2048];
    int n = snprintf(req, sizeof req,
                     "POST /api/v1/devices/%s/commands HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Authorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     sns[i], o_host, o_http_port, o_http_auth, strlen(o_cmd_body), o_cmd_body);
    conns[i].cmd_wait = 1;
    conns[i].cmd_t0 = mono_us();
    http_t0 = conns[i].cmd_t0;
    http_busy = true;
    cm_posted++;
    raw_send(http_idx, req, (size_t)n);
}

static void tick(void) {
    if (phase == PH_CONNECT) {
        while (inflight < o_concurrency && next_open < n_total) {
            int i = next_open == 0 ? ctl_idx : next_open - 1; /* the control connection first */
            if (!o_control_login && i == ctl_idx) {
                conns[i].state = C_DEAD;
                next_open++;
                continue;
            }
            next_open++;
            open_conn(i);
        }
        if (next_open >= n_total && inflight == 0) {
            connect_t1 = t_now;
            next_phase();
        } else if (t_now - connect_t0 > (int64_t)(o_connect_s * 1e6)) {
            fprintf(stderr, "loadgen: connect phase timed out with %d in flight\n", inflight);
            for (int i = 0; i < n_total; i++)
                if (conns[i].state == C_CONNECTING || conns[i].state == C_HANDSHAKE || conns[i].state == C_LOGIN)
                    conn_close(i, true);
            connect_t1 = t_now;
            next_phase();
        }
        return;
    }
    if (phase == PH_DONE) return;
    if (ph_draining) {
        if (drained() || t_now >= ph_drain_end) finish_phase();
        return;
    }
    switch (phase) {
    case PH_IDLE:
        if (t_now >= ph_end) finish_phase();
        return;
    case PH_BCAST_LAT: {
        int s = bc_next - 1;
        bool done = bc[s].count >= n_devices_ready || t_now - bc[s].t_send > 5000000;
        if (done) {
            /* the first BCAST_WARMUP broadcasts warm caches and JITs and are not sampled */
            if (bc[s].count > 0 && s - bc_lat_first >= BCAST_WARMUP) sample(&s_bc_lat, bc[s].t_last - bc[s].t_send);
            if (t_now >= ph_end || bc_next - bc_lat_first >= o_bcast_count + BCAST_WARMUP)
                finish_phase();
            else
                send_broadcast();
        }
        return;
    }
    case PH_BCAST_SAT:
        if (t_now >= ph_end) {
            start_drain();
            return;
        }
        while (bc_open() < o_bcast_window && bc_next < MAX_BCAST) send_broadcast();
        return;
    case PH_REQ_SAT:
        if (t_now >= ph_end) start_drain();
        return;
    case PH_REQ_HALF: {
        if (t_now >= ph_end) {
            start_drain();
            return;
        }
        uint64_t due = (uint64_t)(rq_half_rate * (t_now - ph_t0) / 1e6);
        int guard = 0;
        while (rq_half_sent < due && guard++ < 100000) {
            int i = rq_rr++ % o_conns;
            if (conns[i].state != C_READY) continue;
            rq_half_sent++;
            send_request(i);
        }
        return;
    }
    case PH_INGEST_SUB:
        if (sub_ok) next_phase();
        else if (t_now >= ph_end) {
            fprintf(stderr, "loadgen: subscribe got no reply; ingest skipped\n");
            next_phase();
        }
        return;
    case PH_INGEST: {
        if (t_now >= ph_end) {
            start_drain();
            return;
        }
        uint64_t due = (uint64_t)((double)n_devices_ready * (t_now - ph_t0) / 1e6);
        if (due > in_target) due = in_target;
        int guard = 0;
        while (in_sent < due && guard++ < 100000) {
            int i = (int)(in_sent % (uint64_t)o_conns);
            in_sent++;
            if (conns[i].state != C_READY) continue;
            size_t n = expand(o_status_frame, (int64_t)in_sent, mono_us(), "", tmpl, sizeof tmpl);
            ws_text(i, tmpl, n);
        }
        return;
    }
    case PH_COMMAND: {
        if (t_now >= ph_end) {
            start_drain();
            return;
        }
        uint64_t due = (uint64_t)(o_cmd_rate * (t_now - ph_t0) / 1e6);
        if (cm_posted + cm_skipped < due && conns[http_idx].state == C_READY && !http_busy) http_post();
        else if (cm_posted + cm_skipped + 1 < due && http_busy) cm_skipped++; /* HTTP slower than the rate */
        return;
    }
    default: return;
    }
}

/* ---- message handling ---- */
static void on_message(int i, const char *p, size_t n) {
    conn_t *c = &conns[i];
    frames_rx++;
    bool resp = has(p, n, "galbot_response");
    int64_t code = -1;
    if (c->state == C_LOGIN) {
        if (!resp) return;
        find_int(p, n, "\"code\"", &code);
        inflight--;
        if (code == 0) {
            c->state = C_READY;
            n_ready++;
            if (c->role == R_DEVICE) n_devices_ready++;
            sample(&s_connect, t_now - c->t_start);
        } else {
            login_fail++;
            if (login_fail <= 3) fprintf(stderr, "loadgen: login failed: %.*s\n", (int)(n > 300 ? 300 : n), p);
            c->state = C_DEAD; /* not in flight any more */
            n_failed++;
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
        }
        return;
    }
    if (c->role == R_CONTROL) {
        if (resp) {
            find_int(p, n, "\"code\"", &code);
            if (has(p, n, "\"sub\"")) {
                sub_ok = code == 0;
                if (!sub_ok) fprintf(stderr, "loadgen: subscribe failed: %.*s\n", (int)(n > 300 ? 300 : n), p);
                return;
            }
            bc_replies++;
            if (code != 0) {
                bc_reply_err++;
                if (bc_reply_err <= 3) fprintf(stderr, "loadgen: broadcast reply: %.*s\n", (int)(n > 300 ? 300 : n), p);
            }
            return;
        }
        if (phase == PH_INGEST) {
            int64_t t;
            if (find_int(p, n, "\"t_us\"", &t) && has(p, n, "device_status")) {
                in_push++;
                sample(&s_ingest, mono_us() - t);
            }
        }
        return;
    }
    /* device */
    if (resp) {
        find_int(p, n, "\"code\"", &code);
        if (phase == PH_REQ_SAT || phase == PH_REQ_HALF) {
            int64_t t;
            if (c->outstanding > 0) c->outstanding--;
            rq_replies++;
            if (code != 0) {
                rq_err++;
                if (rq_err <= 3) fprintf(stderr, "loadgen: request reply: %.*s\n", (int)(n > 300 ? 300 : n), p);
            }
            if (find_int(p, n, "\"request_id\"", &t)) {
                if (phase == PH_REQ_SAT) sample(&s_rq_sat, mono_us() - t);
                else sample(&s_rq_half, mono_us() - t);
            }
            if (phase == PH_REQ_SAT && !ph_draining) {
                rq_sat_replies++;
                send_request(i);
            } else if (phase == PH_REQ_HALF && !ph_draining) {
                rq_half_replies++;
            }
        } else if (phase == PH_INGEST) {
            if (code == 0) in_ok++;
            else {
                in_err++;
                if (in_err <= 3) fprintf(stderr, "loadgen: status reply: %.*s\n", (int)(n > 300 ? 300 : n), p);
            }
        } else if (phase == PH_COMMAND) {
            if (c->cmd_wait) {
                /* the round trip ends with the ack's reply; a non-zero code is counted, not hidden */
                sample(&s_cmd, mono_us() - c->cmd_t0);
                if (code == 0) {
                    cm_acked++;
                } else {
                    cm_ack_err++;
                    if (cm_ack_err <= 3) fprintf(stderr, "loadgen: ack reply: %.*s\n", (int)(n > 300 ? 300 : n), p);
                }
                c->cmd_wait = 0;
            }
        }
        return;
    }
    /* a push */
    int64_t s;
    if (find_int(p, n, "\"bseq\"", &s)) {
        if (s >= 0 && s < bc_next) {
            bc[s].count++;
            bc[s].t_last = t_now;
            if (s >= bc_sat_first && phase == PH_BCAST_SAT) {
                bc_received_sat++;
                if (!ph_draining) bc_deliveries_sat++;
            }
        }
        return;
    }
    if (has(p, n, "device_command")) {
        char cid[256];
        cm_pushes++;
        if (!find_str(p, n, "\"command_id\"", cid, sizeof cid)) return;
        if (!c->cmd_wait) cm_dups++;
        size_t m = expand(o_ack_frame, (int64_t)cm_pushes, 0, cid, tmpl, sizeof tmpl);
        ws_text(i, tmpl, m);
    }
}

static void on_close_frame(int i, const char *p, size_t n) {
    int code = n >= 2 ? ((uint8_t)p[0] << 8 | (uint8_t)p[1]) : 1005;
    int k;
    for (k = 0; k < n_close_codes; k++)
        if (close_codes[k][0] == code) break;
    if (k == n_close_codes && n_close_codes < 16) {
        close_codes[k][0] = code;
        n_close_codes++;
    }
    if (k < 16) close_codes[k][1]++;
    closed_by_server++;
    if (conns[i].role == R_CONTROL) {
        control_close_code = code;
        fprintf(stderr, "loadgen: control connection closed by the server with %d in phase %s\n", code,
                phase_name(phase));
    }
    conn_close(i, false);
}

/* Parse every complete frame in p[0..n); returns bytes consumed, or -1 when the conn closed. */
static ssize_t parse_frames(int i, const char *p, size_t n) {
    size_t off = 0;
    conn_t *c = &conns[i];
    while (n - off >= 2) {
        const uint8_t *h = (const uint8_t *)p + off;
        int fin = h[0] & 0x80, op = h[0] & 0x0f, masked = h[1] & 0x80;
        uint64_t len = h[1] & 0x7f;
        size_t hl = 2;
        if (len == 126) {
            if (n - off < 4) break;
            len = (uint64_t)h[2] << 8 | h[3];
            hl = 4;
        } else if (len == 127) {
            if (n - off < 10) break;
            len = 0;
            for (int k = 0; k < 8; k++) len = len << 8 | h[2 + k];
            hl = 10;
        }
        if (masked) hl += 4;
        if (len > (1u << 24)) {
            proto_err++;
            conn_close(i, true);
            return -1;
        }
        if (n - off < hl + len) break;
        char *pl = (char *)p + off + hl;
        if (masked) {
            const uint8_t *mk = h + hl - 4;
            for (uint64_t k = 0; k < len; k++) pl[k] ^= mk[k & 3];
        }
        off += hl + len;
        if (op >= 8) {
            if (op == 8) {
                on_close_frame(i, pl, len);
                return -1;
            }
            if (op == 9) {
                pings_rx++;
                ws_send(i, 10, pl, len);
                if (c->fd < 0) return -1;
            }
            continue;
        }
        if (op != 0) { /* first frame of a message */
            if (fin) {
                on_message(i, pl, len);
            } else {
                c->in_frag = 1;
                c->msg_op = (uint8_t)op;
                c->msg.len = 0;
                buf_append(&c->msg, pl, len);
            }
        } else { /* continuation */
            if (!c->in_frag) {
                proto_err++;
                continue;
            }
            buf_append(&c->msg, pl, len);
            if (fin) {
                c->in_frag = 0;
                on_message(i, c->msg.p, c->msg.len);
                c->msg.len = 0;
            }
        }
        if (c->fd < 0) return -1;
    }
    return (ssize_t)off;
}

static void http_parse(int i) {
    conn_t *c = &conns[i];
    while (c->in.len) {
        char *e = memmem(c->in.p, c->in.len, "\r\n\r\n", 4);
        if (!e) return;
        size_t hl = (size_t)(e - c->in.p) + 4;
        int status = 0;
        sscanf(c->in.p, "HTTP/1.%*d %d", &status);
        size_t cl = 0;
        for (char *q = c->in.p; q < e; q++)
            if ((*q == '\n') && !strncasecmp(q + 1, "content-length:", 15)) cl = (size_t)atol(q + 16);
        if (c->in.len < hl + cl) return;
        if (status >= 200 && status < 300) cm_http_ok++;
        else {
            cm_http_err++;
            if (cm_http_err <= 3) fprintf(stderr, "loadgen: HTTP %d: %.*s\n", status, (int)(cl > 300 ? 300 : cl), c->in.p + hl);
        }
        sample(&s_http, mono_us() - http_t0);
        http_busy = false;
        buf_consume(&c->in, hl + cl);
    }
}

static void on_readable(int i) {
    conn_t *c = &conns[i];
    for (int rounds = 0; rounds < 4 && c->fd >= 0; rounds++) {
        ssize_t r = read(c->fd, scratch, sizeof scratch);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            if (c->state == C_READY && c->role != R_HTTP) closed_by_server++;
            conn_close(i, false);
            return;
        }
        if (r < 0) return;
        bytes_rx += (uint64_t)r;
        if (c->role == R_HTTP) {
            buf_append(&c->in, scratch, (size_t)r);
            http_parse(i);
        } else if (c->state == C_HANDSHAKE) {
            buf_append(&c->in, scratch, (size_t)r);
            char *e = memmem(c->in.p, c->in.len, "\r\n\r\n", 4);
            if (e) {
                if (strncmp(c->in.p, "HTTP/1.1 101", 12) != 0) {
                    fprintf(stderr, "loadgen: handshake refused: %.*s\n", (int)(e - c->in.p), c->in.p);
                    conn_close(i, false);
                    return;
                }
                buf_consume(&c->in, (size_t)(e - c->in.p) + 4);
                c->state = C_LOGIN;
                if (c->role == R_CONTROL) ws_text(i, o_control_login, strlen(o_control_login));
                else ws_text(i, login_frames[i], strlen(login_frames[i]));
                if (c->fd < 0) return;
                if (c->in.len) {
                    ssize_t used = parse_frames(i, c->in.p, c->in.len);
                    if (used < 0) return;
                    buf_consume(&c->in, (size_t)used);
                }
            }
        } else if (c->in.len == 0) {
            ssize_t used = parse_frames(i, scratch, (size_t)r);
            if (used < 0) return;
            if ((size_t)used < (size_t)r) buf_append(&c->in, scratch + used, (size_t)r - (size_t)used);
        } else {
            buf_append(&c->in, scratch, (size_t)r);
            ssize_t used = parse_frames(i, c->in.p, c->in.len);
            if (used < 0) return;
            buf_consume(&c->in, (size_t)used);
        }
        if ((size_t)r < sizeof scratch) return;
    }
}

static void on_event(int i, uint32_t ev) {
    conn_t *c = &conns[i];
    if (c->fd < 0) return;
    if (c->state == C_CONNECTING) {
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            if (n_failed < 3) fprintf(stderr, "loadgen: connect failed: %s\n", strerror(err));
            conn_close(i, false);
            return;
        }
        ep_mod(i, false);
        if (c->role == R_HTTP) {
            c->state = C_READY;
            return;
        }
        send_handshake(i);
        return;
    }
    if (ev & EPOLLOUT) flush_out(i);
    if (c->fd >= 0 && (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))) on_readable(i);
}

/* ---- output ---- */
static void print_lat(const char *name, samples_t *s) {
    qsort(s->v, s->n, sizeof(uint32_t), cmp_u32);
    printf("\"%s\":{\"n\":%zu,\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f}", name, s->n,
           pct_ms(s, 0.50), pct_ms(s, 0.90), pct_ms(s, 0.99), pct_ms(s, 1.0));
}

static bool phase_ran(int p) {
    for (int k = 0; k < n_phases; k++)
        if (phase_list[k] == p) return true;
    return false;
}

static void report(bool aborted) {
    if (!connect_t1) connect_t1 = t_now; /* stopped while still connecting */
    double connect_s = (connect_t1 - connect_t0) / 1e6;
    printf("{\"conns\":%d,\"devices_ready\":%d,\"control\":%s,\"failed\":%d,\"login_fail\":%llu,\"aborted\":%s,",
           o_conns, n_devices_ready, conns[ctl_idx].state == C_READY ? "true" : "false", n_failed,
           (unsigned long long)login_fail, aborted ? "true" : "false");
    printf("\"connect_s\":%.3f,\"conns_per_s\":%.1f,", connect_s, connect_s > 0 ? n_ready / connect_s : 0);
    print_lat("connect_latency", &s_connect);
    printf(",\"rss_before_kb\":%ld,\"rss_after_kb\":%ld,", rss_before_kb, rss_after_kb);
    if (rss_before_kb > 0 && rss_after_kb > 0 && n_ready > 0)
        printf("\"rss_per_conn_kb\":%.3f,", (double)(rss_after_kb - rss_before_kb) / n_ready);
    printf("\"frames_rx\":%llu,\"bytes_rx\":%llu,\"frames_tx\":%llu,\"pings_rx\":%llu,\"closed_by_server\":%llu,"
           "\"protocol_errors\":%llu,\"close_codes\":{",
           (unsigned long long)frames_rx, (unsigned long long)bytes_rx, (unsigned long long)frames_tx,
           (unsigned long long)pings_rx, (unsigned long long)closed_by_server, (unsigned long long)proto_err);
    for (int k = 0; k < n_close_codes; k++) printf("%s\"%d\":%d", k ? "," : "", close_codes[k][0], close_codes[k][1]);
    printf("},\"control_close_code\":%d", control_close_code);
    printf(",\"loadgen_cpu_s\":%.3f,\"wall_s\":%.3f", cpu_at(), (t_now - t_begin) / 1e6);
    if (phase_ran(PH_BCAST_LAT)) {
        uint64_t expected = 0, received = 0;
        for (int s = bc_sat_first; s < bc_next; s++) {
            expected += (uint64_t)n_devices_ready;
            received += (uint64_t)bc[s].count;
        }
        (void)received;
        bc_expected_sat = bc_next > bc_sat_first ? expected : 0;
        printf(",\"broadcast\":{\"broadcasts\":%d,\"replies\":%llu,\"reply_errors\":%llu,", bc_next,
               (unsigned long long)bc_replies, (unsigned long long)bc_reply_err);
        print_lat("latency", &s_bc_lat);
        for (int s = bc_sat_first; s < bc_next; s++)
            if (bc[s].count > 0) sample(&s_bc_sat_lat, bc[s].t_last - bc[s].t_send);
        printf(",");
        print_lat("saturated_latency", &s_bc_sat_lat);
        printf(",\"sat_broadcasts\":%d,\"deliveries\":%llu,\"elapsed_s\":%.3f,\"deliveries_per_s\":%.1f,"
               "\"expected\":%llu,\"received\":%llu,\"loadgen_cpu_s\":%.3f,\"loadgen_frames_per_cpu_s\":%.0f}",
               bc_next - bc_sat_first, (unsigned long long)bc_deliveries_sat, bc_sat_elapsed,
               bc_sat_elapsed > 0 ? bc_deliveries_sat / bc_sat_elapsed : 0, (unsigned long long)bc_expected_sat,
               (unsigned long long)bc_received_sat, bc_cpu_sat, bc_cpu_sat > 0 ? bc_rx_sat / bc_cpu_sat : 0);
    }
    if (phase_ran(PH_REQ_SAT)) {
        printf(",\"reqresp\":{\"sent\":%llu,\"replies\":%llu,\"errors\":%llu,\"sat_replies\":%llu,"
               "\"sat_elapsed_s\":%.3f,\"replies_per_s\":%.1f,",
               (unsigned long long)rq_sent, (unsigned long long)rq_replies, (unsigned long long)rq_err,
               (unsigned long long)rq_sat_replies, rq_sat_elapsed, rq_sat_rate);
        print_lat("sat_latency", &s_rq_sat);
        printf(",\"half_rate\":%.1f,\"half_sent\":%llu,\"half_replies\":%llu,\"half_elapsed_s\":%.3f,", rq_half_rate,
               (unsigned long long)rq_half_sent, (unsigned long long)rq_half_replies, rq_half_elapsed);
        print_lat("half_latency", &s_rq_half);
        printf("}");
    }
    if (phase_ran(PH_INGEST)) {
        printf(",\"ingest\":{\"subscribed\":%s,\"sent\":%llu,\"ok\":%llu,\"errors\":%llu,\"pushes\":%llu,"
               "\"elapsed_s\":%.3f,\"stored_per_s\":%.1f,\"dropped\":%lld,",
               sub_ok ? "true" : "false", (unsigned long long)in_sent, (unsigned long long)in_ok,
               (unsigned long long)in_err, (unsigned long long)in_push, in_elapsed,
               in_elapsed > 0 ? in_ok / in_elapsed : 0, (long long)in_sent - (long long)in_push);
        print_lat("latency", &s_ingest);
        printf("}");
    }
    if (phase_ran(PH_COMMAND)) {
        printf(",\"command\":{\"posted\":%llu,\"http_ok\":%llu,\"http_errors\":%llu,\"pushes\":%llu,\"duplicates\":%llu,"
               "\"acked\":%llu,\"ack_errors\":%llu,\"skipped\":%llu,\"elapsed_s\":%.3f,",
               (unsigned long long)cm_posted, (unsigned long long)cm_http_ok, (unsigned long long)cm_http_err,
               (unsigned long long)cm_pushes, (unsigned long long)cm_dups, (unsigned long long)cm_acked,
               (unsigned long long)cm_ack_err, (unsigned long long)cm_skipped, cm_elapsed);
        print_lat("latency", &s_cmd);
        printf(",");
        print_lat("http_latency", &s_http);
        printf("}");
    }
    printf("}\n");
    fflush(stdout);
}

static void on_signal(int s) {
    (void)s;
    stop_flag = 1;
}

static void load_logins(void) {
    sns = calloc((size_t)o_conns, sizeof(char *));
    login_frames = calloc((size_t)o_conns, sizeof(char *));
    FILE *f = o_logins ? fopen(o_logins, "r") : NULL;
    if (!f) die("--logins file");
    char *line = NULL;
    size_t cap = 0;
    int k = 0;
    while (k < o_conns && getline(&line, &cap, f) > 0) {
        char *tab = strchr(line, '\t');
        if (!tab) continue;
        *tab = 0;
        char *fr = tab + 1;
        fr[strcspn(fr, "\r\n")] = 0;
        sns[k] = strdup(line);
        login_frames[k] = strdup(fr);
        k++;
    }
    free(line);
    fclose(f);
    if (k < o_conns) {
        fprintf(stderr, "loadgen: %s has %d logins, need %d\n", o_logins, k, o_conns);
        exit(2);
    }
}

static void parse_phases(void) {
    char *dup = strdup(o_phases), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t && n_phases < 14; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "idle")) phase_list[n_phases++] = PH_IDLE;
        else if (!strcmp(t, "broadcast")) {
            phase_list[n_phases++] = PH_BCAST_LAT;
            phase_list[n_phases++] = PH_BCAST_SAT;
        } else if (!strcmp(t, "reqresp")) {
            phase_list[n_phases++] = PH_REQ_SAT;
            phase_list[n_phases++] = PH_REQ_HALF;
        } else if (!strcmp(t, "ingest")) {
            phase_list[n_phases++] = PH_INGEST_SUB;
            phase_list[n_phases++] = PH_INGEST;
        } else if (!strcmp(t, "command")) phase_list[n_phases++] = PH_COMMAND;
        else {
            fprintf(stderr, "loadgen: unknown phase %s\n", t);
            exit(2);
        }
    }
    free(dup);
}

int main(int argc, char **argv) {
    static struct option lo[] = {
        {"host", 1, 0, 'h'},           {"port", 1, 0, 'p'},          {"path", 1, 0, 'P'},
        {"conns", 1, 0, 'n'},          {"concurrency", 1, 0, 'c'},   {"logins", 1, 0, 'l'},
        {"control-login", 1, 0, 'C'},  {"phases", 1, 0, 'f'},        {"idle-s", 1, 0, 1},
        {"bcast-lat-s", 1, 0, 2},      {"bcast-sat-s", 1, 0, 3},     {"bcast-count", 1, 0, 4},
        {"bcast-window", 1, 0, 5},     {"req-s", 1, 0, 6},           {"ingest-s", 1, 0, 7},
        {"cmd-s", 1, 0, 8},            {"cmd-rate", 1, 0, 9},        {"http-port", 1, 0, 10},
        {"http-auth", 1, 0, 11},       {"server-pid", 1, 0, 12},     {"max-s", 1, 0, 13},
        {"bcast-frame", 1, 0, 14},     {"req-frame", 1, 0, 15},      {"status-frame", 1, 0, 16},
        {"sub-frame", 1, 0, 17},       {"ack-frame", 1, 0, 18},      {"cmd-body", 1, 0, 19},
        {"connect-s", 1, 0, 20},       {"drain-s", 1, 0, 21},        {"control-port", 1, 0, 22},
        {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 'h': o_host = optarg; break;
        case 'p': o_port = atoi(optarg); break;
        case 'P': o_path = optarg; break;
        case 'n': o_conns = atoi(optarg); break;
        case 'c': o_concurrency = atoi(optarg); break;
        case 'l': o_logins = optarg; break;
        case 'C': o_control_login = optarg; break;
        case 'f': o_phases = optarg; break;
        case 1: o_idle_s = atof(optarg); break;
        case 2: o_bcast_lat_s = atof(optarg); break;
        case 3: o_bcast_sat_s = atof(optarg); break;
        case 4: o_bcast_count = atoi(optarg); break;
        case 5: o_bcast_window = atoi(optarg); break;
        case 6: o_req_s = atof(optarg); break;
        case 7: o_ingest_s = atof(optarg); break;
        case 8: o_cmd_s = atof(optarg); break;
        case 9: o_cmd_rate = atoi(optarg); break;
        case 10: o_http_port = atoi(optarg); break;
        case 11: o_http_auth = optarg; break;
        case 12: o_server_pid = atoi(optarg); break;
        case 13: o_max_s = atof(optarg); break;
        case 14: o_bcast_frame = optarg; break;
        case 15: o_req_frame = optarg; break;
        case 16: o_status_frame = optarg; break;
        case 17: o_sub_frame = optarg; break;
        case 18: o_ack_frame = optarg; break;
        case 19: o_cmd_body = optarg; break;
        case 20: o_connect_s = atof(optarg); break;
        case 21: o_drain_s = atof(optarg); break;
        case 22: o_control_port = atoi(optarg); break;
        default: fprintf(stderr, "usage: loadgen --port N --conns N --logins FILE [options]\n"); return 2;
        }
    }
    if (strncmp(o_host, "127.", 4) != 0) {
        fprintf(stderr, "loadgen: loopback (127.x.x.x) only\n");
        return 2;
    }
    if (o_conns < 1) return 2;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    load_logins();
    parse_phases();
    bc = calloc(MAX_BCAST, sizeof(bcast_t));
    n_total = o_conns + 1;
    ctl_idx = o_conns;
    http_idx = o_conns + 1;
    conns = calloc((size_t)o_conns + 2, sizeof(conn_t));
    for (int i = 0; i < o_conns + 2; i++) {
        conns[i].fd = -1;
        conns[i].role = i == ctl_idx ? R_CONTROL : i == http_idx ? R_HTTP : R_DEVICE;
    }
    memset(&srv_addr, 0, sizeof srv_addr);
    srv_addr.sin_family = AF_INET;
    srv_addr.sin_port = htons((uint16_t)o_port);
    if (inet_pton(AF_INET, o_host, &srv_addr.sin_addr) != 1) die("bad --host");
    http_addr = srv_addr;
    http_addr.sin_port = htons((uint16_t)(o_http_port ? o_http_port : o_port));
    ctl_addr = srv_addr;
    ctl_addr.sin_port = htons((uint16_t)(o_control_port ? o_control_port : o_port));
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    rng ^= (uint64_t)mono_us() * 0x2545F4914F6CDD1Dull;
    t_now = t_begin = connect_t0 = mono_us();
    rss_before_kb = read_rss_kb();
    int64_t hard_end = t_begin + (int64_t)(o_max_s * 1e6);
    struct epoll_event evs[1024];
    bool aborted = false;
    while (phase != PH_DONE) {
        t_now = mono_us();
        if (stop_flag || t_now > hard_end) {
            aborted = true;
            fprintf(stderr, "loadgen: %s; reporting what was measured\n", stop_flag ? "stopped" : "--max-s reached");
            break;
        }
        tick();
        if (phase == PH_DONE) break;
        bool paced = phase == PH_REQ_HALF || phase == PH_INGEST || phase == PH_COMMAND || phase == PH_CONNECT;
        int ne = epoll_wait(epfd, evs, 1024, paced ? 1 : 5);
        if (ne < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        t_now = mono_us();
        for (int k = 0; k < ne; k++) on_event((int)evs[k].data.u32, evs[k].events);
    }
    if (rss_after_kb < 0) rss_after_kb = read_rss_kb();
    report(aborted);
    for (int i = 0; i < o_conns + 2; i++)
        if (conns[i].fd >= 0) conn_close(i, true);
    return aborted ? 1 : 0;
}
