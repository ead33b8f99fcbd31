/*
 * A game server in C that embeds the plugbus host: it starts the example plugins, ticks a few
 * simulated players, dispatches their chat and a command, and prints what the plugins decided.
 *
 *     cc -std=c11 -Wall -Wextra -I ffi ffi/examples/host.c -L target/release -lplugbus \
 *        -Wl,-rpath,target/release -o host
 *     ./host target/release/examples/chat_filter target/release/examples/move_counter
 *
 * Output: one line per decision ("chat <message>: cancelled" / "rewritten to <text>" /
 * "passed"), per action ("action <plugin> send_chat <target> <message>"), per plugin log line
 * and per notice, then "moves sent <n>" and "done". Exit status 0 when every call succeeded.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "plugbus.h"

#define PLAYERS 10
#define TICKS 60

static int check(plugbus_status rc, const char *what) {
    if (rc < 0) {
        fprintf(stderr, "%s failed: %s: %s\n", what, plugbus_status_name(rc), plugbus_last_error());
        return 0;
    }
    return 1;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The player's UUID as text, as df.plugin events carry it. */
static void uuid_text(const uint8_t uuid[16], char out[37]) {
    static const char *hex = "0123456789abcdef";
    int o = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) out[o++] = '-';
        out[o++] = hex[uuid[i] >> 4];
        out[o++] = hex[uuid[i] & 15];
    }
    out[o] = 0;
}

static void drain(plugbus_host *h) {
    plugbus_action a;
    while (plugbus_host_next_action(h, &a) == PLUGBUS_OK) {
        if (a.kind == PLUGBUS_ACTION_SEND_CHAT) {
            plugbus_str target, message;
            if (check(plugbus_host_action_send_chat(h, &target, &message), "action_send_chat"))
                printf("action %.*s send_chat %.*s %.*s\n", (int)a.plugin.len, a.plugin.ptr,
                       (int)target.len, target.ptr, (int)message.len, message.ptr);
        } else {
            printf("action %.*s kind %d (%zu bytes)\n", (int)a.plugin.len, a.plugin.ptr, a.kind, a.len);
        }
    }
    plugbus_str plugin, level, message;
    while (plugbus_host_next_log(h, &plugin, &level, &message) == PLUGBUS_OK)
        printf("log %.*s %.*s: %.*s\n", (int)plugin.len, plugin.ptr, (int)level.len, level.ptr,
               (int)message.len, message.ptr);
    plugbus_str text;
    while (plugbus_host_next_notice(h, &plugin, &text) == PLUGBUS_OK)
        printf("notice %.*s %.*s\n", (int)plugin.len, plugin.ptr, (int)text.len, text.ptr);
}

static int decide(plugbus_host *h, uint64_t pending, const char *what) {
    plugbus_outcome o;
    plugbus_status rc = plugbus_host_wait(h, pending, 5 * 1000 * 1000, &o);
    if (!check(rc, "wait")) return 0;
    if (o.cancelled) {
        printf("%s: cancelled\n", what);
    } else {
        plugbus_str chat;
        if (plugbus_host_outcome_chat(h, &chat) == PLUGBUS_OK)
            printf("%s: rewritten to %.*s\n", what, (int)chat.len, chat.ptr);
        else
            printf("%s: passed\n", what);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CHAT_FILTER MOVE_COUNTER\n", argv[0]);
        return 2;
    }
    char config[4096];
    int n = snprintf(config, sizeof config,
                     "[host]\nresponse_timeout_ms = 5000\nhello_timeout_ms = 30000\n"
                     "[[plugin]]\nid = \"chat_filter\"\ncommand = \"%s\"\n"
                     "args = [\"--banned\", \"darn\", \"--rewrite\", \"heck=h*ck\"]\nrequired = true\n"
                     "[[plugin]]\nid = \"move_counter\"\ncommand = \"%s\"\nrequired = true\n",
                     argv[1], argv[2]);
    if (n < 0 || (size_t)n >= sizeof config) return 2;

    plugbus_host *h = NULL;
    if (!check(plugbus_host_start(config, (size_t)n, &h), "start")) return 1;

    plugbus_move_record moves[PLAYERS];
    memset(moves, 0, sizeof moves);
    char uuids[PLAYERS][37];
    for (int p = 0; p < PLAYERS; p++) {
        moves[p].uuid[0] = (uint8_t)(p + 1);
        moves[p].uuid[6] = 0x40; /* a version-4 UUID */
        moves[p].uuid[8] = 0x80;
        uuid_text(moves[p].uuid, uuids[p]);
    }
    const char *name = "Steve";
    const char *chats[] = {"hello everyone", "oh darn, lava", "what the heck was that"};
    int ok = 1;

    for (int t = 0; t < TICKS && ok; t++) {
        uint64_t tick;
        ok &= check(plugbus_host_begin_tick(h, &tick), "begin_tick");
        if (t == 0)
            ok &= check(plugbus_host_publish_join(h, uuids[0], 36, name, strlen(name)), "publish_join");
        for (int p = 0; p < PLAYERS; p++) {
            moves[p].x = p + t * 0.1;
            moves[p].y = 64.0;
            moves[p].z = t * 0.05;
            moves[p].yaw = (float)(t % 360);
        }
        ok &= check(plugbus_host_publish_moves(h, moves, PLAYERS), "publish_moves");
        uint64_t pending = 0;
        const char *what = NULL;
        char label[64];
        if (t >= 10 && t < 13) {
            const char *msg = chats[t - 10];
            ok &= check(plugbus_host_dispatch_chat(h, uuids[0], 36, name, strlen(name), msg,
                                                    strlen(msg), &pending),
                        "dispatch_chat");
            snprintf(label, sizeof label, "chat %s", msg);
            what = label;
        } else if (t == 20) {
            const char *raw = "/filterstats";
            ok &= check(plugbus_host_dispatch_command(h, uuids[0], 36, name, strlen(name), raw,
                                                       strlen(raw), &pending),
                        "dispatch_command");
            snprintf(label, sizeof label, "command %s", raw);
            what = label;
        }
        ok &= check(plugbus_host_end_tick(h), "end_tick");
        if (what) ok &= decide(h, pending, what);
        drain(h);
        sleep_ms(10);
    }

    /* Let the last actions and logs arrive. */
    for (int t = 0; t < 20 && ok; t++) {
        ok &= check(plugbus_host_begin_tick(h, NULL), "begin_tick");
        ok &= check(plugbus_host_end_tick(h), "end_tick");
        drain(h);
        sleep_ms(10);
    }

    plugbus_str metrics;
    if (check(plugbus_host_metrics(h, &metrics), "metrics")) {
        /* The moves sent to move_counter, from the Prometheus text. */
        const char *key = "plugbus_plugin_total{plugin=\"move_counter\",what=\"moves_sent\"} ";
        size_t klen = strlen(key);
        for (size_t i = 0; i + klen < metrics.len; i++) {
            if (memcmp(metrics.ptr + i, key, klen) == 0) {
                printf("moves sent %ld\n", strtol(metrics.ptr + i + klen, NULL, 10));
                break;
            }
        }
    } else {
        ok = 0;
    }
    ok &= check(plugbus_host_shutdown(h, "example over", strlen("example over")), "shutdown");
    /* The handle is gone: a later call is an error, not a crash. */
    if (plugbus_host_begin_tick(h, NULL) != PLUGBUS_ERR_CLOSED) ok = 0;
    printf("done\n");
    return ok ? 0 : 1;
}
