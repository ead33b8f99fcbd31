/*
 * move_counter.c: counts moves per player and prints a summary every second, like the Rust
 * example examples/move_counter.rs. Moves arrive as plugbus_move_record arrays read in place
 * from shared memory.
 *
 * Started by a plugbus host (which sets PLUGBUS_SEGMENT and PLUGBUS_PLUGIN_ID).
 * Options: --wait spin|park|spin-then-park, --exit-after N (stop after N summaries).
 * If PLUGBUS_SUMMARY_FILE is set, a one-line summary is written there on exit (for tests).
 *
 * Build: see ffi/README.md.
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "plugbus.h"

/* Per-player counts: an open-addressing hash table keyed by the 16-byte UUID. */
typedef struct {
    uint8_t uuid[16];
    uint64_t moves;
    int used;
} player_slot;

typedef struct {
    player_slot *slots;
    size_t cap; /* a power of two */
    size_t len;
    uint64_t total;
    uint64_t frames;
    uint64_t conflated_frames; /* frames flagged PLUGBUS_MOVES_CONFLATED: this plugin lagged */
    uint64_t last_tick;
    uint64_t window_moves;
    double last_summary;
    uint64_t summaries;
    uint64_t exit_after; /* 0: never */
    int failed;          /* out of memory */
} counter;

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t hash_uuid(const uint8_t uuid[16]) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int i = 0; i < 16; i++) {
        h ^= uuid[i];
        h *= 1099511628211ull;
    }
    return (size_t)h;
}

static player_slot *find_slot(player_slot *slots, size_t cap, const uint8_t uuid[16]) {
    size_t i = hash_uuid(uuid) & (cap - 1);
    while (slots[i].used && memcmp(slots[i].uuid, uuid, 16) != 0) {
        i = (i + 1) & (cap - 1);
    }
    return &slots[i];
}

static int grow(counter *c) {
    size_t cap = c->cap ? c->cap * 2 : 64;
    player_slot *slots = calloc(cap, sizeof *slots);
    if (!slots) {
        return -1;
    }
    for (size_t i = 0; i < c->cap; i++) {
        if (c->slots[i].used) {
            *find_slot(slots, cap, c->slots[i].uuid) = c->slots[i];
        }
    }
    free(c->slots);
    c->slots = slots;
    c->cap = cap;
    return 0;
}

static void count_move(counter *c, const uint8_t uuid[16]) {
    if ((c->len + 1) * 4 > c->cap * 3 && grow(c) != 0) {
        c->failed = 1;
        return;
    }
    player_slot *s = find_slot(c->slots, c->cap, uuid);
    if (!s->used) {
        s->used = 1;
        memcpy(s->uuid, uuid, 16);
        c->len++;
    }
    s->moves++;
}

static uint64_t busiest(const counter *c) {
    uint64_t max = 0;
    for (size_t i = 0; i < c->cap; i++) {
        if (c->slots[i].used && c->slots[i].moves > max) {
            max = c->slots[i].moves;
        }
    }
    return max;
}

/* Prints a summary if a second has passed; returns 1 when --exit-after is reached. */
static int maybe_summary(counter *c) {
    double now = now_seconds();
    if (now - c->last_summary < 1.0) {
        return 0;
    }
    c->last_summary = now;
    c->summaries++;
    printf("moves: %" PRIu64 " in the last second, %" PRIu64 " total from %zu players in %" PRIu64
           " frames (busiest player %" PRIu64 "), tick %" PRIu64 "\n",
           c->window_moves, c->total, c->len, c->frames, busiest(c), c->last_tick);
    c->window_moves = 0;
    return c->exit_after && c->summaries >= c->exit_after;
}

static void on_moves(void *user, uint64_t tick, uint32_t flags, const plugbus_move_record *records, size_t count) {
    counter *c = user;
    c->frames++;
    if (flags & PLUGBUS_MOVES_CONFLATED) {
        c->conflated_frames++;
    }
    c->last_tick = tick;
    for (size_t i = 0; i < count; i++) {
        count_move(c, records[i].uuid);
    }
    c->total += count;
    c->window_moves += count;
}

static int fail(plugbus_plugin *p, const char *what, plugbus_status rc) {
    fprintf(stderr, "move_counter: %s: %s: %s\n", what, plugbus_status_name(rc), plugbus_last_error());
    plugbus_close(p);
    return 1;
}

static void write_summary(const counter *c, const char *how) {
    const char *path = getenv("PLUGBUS_SUMMARY_FILE");
    if (!path) {
        return;
    }
    FILE *f = fopen(path, "w");
    if (!f) {
        perror("move_counter: PLUGBUS_SUMMARY_FILE");
        return;
    }
    fprintf(f, "end=%s moves=%" PRIu64 " players=%zu frames=%" PRIu64 " conflated_frames=%" PRIu64 " last_tick=%" PRIu64 "\n",
            how, c->total, c->len, c->frames, c->conflated_frames, c->last_tick);
    fclose(f);
}

int main(int argc, char **argv) {
    int32_t wait = PLUGBUS_WAIT_SPIN_THEN_PARK;
    counter c = {0};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0 && i + 1 < argc) {
            const char *w = argv[++i];
            if (strcmp(w, "spin") == 0) {
                wait = PLUGBUS_WAIT_SPIN;
            } else if (strcmp(w, "park") == 0) {
                wait = PLUGBUS_WAIT_PARK;
            } else if (strcmp(w, "spin-then-park") == 0 || strcmp(w, "default") == 0) {
                wait = PLUGBUS_WAIT_SPIN_THEN_PARK;
            } else {
                fprintf(stderr, "move_counter: unknown wait strategy \"%s\"\n", w);
                return 1;
            }
        } else if (strcmp(argv[i], "--exit-after") == 0 && i + 1 < argc) {
            c.exit_after = strtoull(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "move_counter: unknown argument \"%s\"\n", argv[i]);
            return 1;
        }
    }
    /* The host forwards stdout into its log line by line. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    plugbus_plugin *p = NULL;
    plugbus_status rc = plugbus_open_env(&p);
    if (rc != PLUGBUS_OK) {
        return fail(p, "open", rc);
    }
    const int32_t types[] = {PLUGBUS_EVENT_PLAYER_MOVE};
    if ((rc = plugbus_hello(p, "move_counter", "0.1.0")) != PLUGBUS_OK ||
        (rc = plugbus_subscribe(p, types, sizeof types / sizeof types[0])) != PLUGBUS_OK ||
        (rc = plugbus_set_wait(p, wait)) != PLUGBUS_OK) {
        return fail(p, "configure", rc);
    }
    if ((rc = plugbus_connect(p)) != PLUGBUS_OK) {
        return fail(p, "connect", rc);
    }
    plugbus_str boot;
    if (plugbus_host_boot_id(p, &boot) == PLUGBUS_OK) {
        printf("move_counter connected (host boot %.*s)\n", (int)boot.len, boot.ptr);
    }

    plugbus_callbacks cb = {.user = &c, .on_moves = on_moves};
    c.last_summary = now_seconds();
    const char *how = "exit-after";
    while ((rc = plugbus_poll(p, &cb, 100)) == PLUGBUS_OK) {
        if (c.failed) {
            fprintf(stderr, "move_counter: out of memory\n");
            how = "error";
            break;
        }
        if (maybe_summary(&c)) {
            break;
        }
    }
    int status = 0;
    if (rc == PLUGBUS_SHUTDOWN) {
        plugbus_str reason = {0};
        plugbus_shutdown_reason(p, &reason);
        printf("move_counter stopping (%.*s): %" PRIu64 " moves from %zu players\n", (int)reason.len,
               reason.ptr, c.total, c.len);
        how = "shutdown";
    } else if (rc != PLUGBUS_OK) {
        fprintf(stderr, "move_counter: poll: %s: %s\n", plugbus_status_name(rc), plugbus_last_error());
        how = "error";
        status = 1;
    }
    write_summary(&c, how);
    plugbus_close(p);
    free(c.slots);
    return status;
}
