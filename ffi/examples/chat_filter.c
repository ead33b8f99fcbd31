/*
 * chat_filter.c: cancels chat containing a banned word, rewrites another word, and answers a
 * command it registered (/filterstats), like the Rust example examples/chat_filter.rs. It reads
 * events through the accessors, so it needs no protobuf library.
 *
 * Started by a plugbus host (which sets PLUGBUS_SEGMENT and PLUGBUS_PLUGIN_ID).
 * Options: --banned WORD (default darn), --rewrite FROM=TO (default heck=h*ck),
 * --wait spin|park|spin-then-park.
 * If PLUGBUS_SUMMARY_FILE is set, a one-line summary is written there on exit (for tests).
 *
 * Build: see ffi/README.md.
 */
#define _POSIX_C_SOURCE 200809L

#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugbus.h"

typedef struct {
    plugbus_plugin *plugin;
    char banned[64];
    char from[64];
    char to[64];
    uint64_t cancelled;
    uint64_t rewritten;
    uint64_t passed;
    uint64_t errors;
} filter;

/* Index of the first ASCII-case-insensitive occurrence of the lowercase `needle` in
 * `hay[0..len)` at or after `start`, or -1. */
static long find_ci(const char *hay, size_t len, size_t start, const char *needle) {
    size_t n = strlen(needle);
    if (n == 0 || n > len) {
        return -1;
    }
    for (size_t i = start; i + n <= len; i++) {
        size_t j = 0;
        while (j < n && tolower((unsigned char)hay[i + j]) == needle[j]) {
            j++;
        }
        if (j == n) {
            return (long)i;
        }
    }
    return -1;
}

/* Replaces each case-insensitive occurrence of `from` by `to`; returns a malloc'd buffer of
 * *out_len bytes (the caller frees it), or NULL when out of memory. */
static char *replace_ci(const char *text, size_t len, const char *from, const char *to, size_t *out_len) {
    size_t from_len = strlen(from), to_len = strlen(to), count = 0;
    for (long at = find_ci(text, len, 0, from); at >= 0; at = find_ci(text, len, (size_t)at + from_len, from)) {
        count++;
    }
    size_t cap = len - count * from_len + count * to_len;
    char *out = malloc(cap + 1);
    if (!out) {
        return NULL;
    }
    size_t o = 0, rest = 0;
    for (long at = find_ci(text, len, 0, from); at >= 0; at = find_ci(text, len, (size_t)at + from_len, from)) {
        memcpy(out + o, text + rest, (size_t)at - rest);
        o += (size_t)at - rest;
        memcpy(out + o, to, to_len);
        o += to_len;
        rest = (size_t)at + from_len;
    }
    memcpy(out + o, text + rest, len - rest);
    o += len - rest;
    out[o] = '\0';
    *out_len = o;
    return out;
}

/* Counts and reports a failed call; returns 1 if it failed. */
static int check(filter *f, plugbus_status rc, const char *what) {
    if (rc == PLUGBUS_OK) {
        return 0;
    }
    f->errors++;
    fprintf(stderr, "chat_filter: %s: %s: %s\n", what, plugbus_status_name(rc), plugbus_last_error());
    return 1;
}

static void on_chat(filter *f, plugbus_event *event) {
    plugbus_str player = {0}, message = {0};
    if (check(f, plugbus_event_chat(event, &player, NULL, &message), "chat fields")) {
        return;
    }
    if (find_ci(message.ptr, message.len, 0, f->banned) >= 0) {
        f->cancelled++;
        static const char blocked[] = "Your message was blocked by the chat filter.";
        check(f, plugbus_send_chat(f->plugin, player.ptr, player.len, blocked, strlen(blocked)), "send_chat");
        check(f, plugbus_reply_cancel(event), "cancel");
    } else if (find_ci(message.ptr, message.len, 0, f->from) >= 0) {
        f->rewritten++;
        size_t len = 0;
        char *text = replace_ci(message.ptr, message.len, f->from, f->to, &len);
        if (!text) {
            fprintf(stderr, "chat_filter: out of memory\n");
            return;
        }
        check(f, plugbus_reply_set_chat_message(event, text, len), "set_chat_message");
        free(text); /* the reply was copied */
    } else {
        f->passed++;
        check(f, plugbus_reply_ack(event), "ack");
    }
}

static void on_command(filter *f, plugbus_event *event) {
    /* `command` is the command's name without the slash; the event's `name` is the player's. */
    plugbus_str player = {0}, command = {0};
    if (check(f, plugbus_event_command(event, &player, NULL, &command, NULL, NULL), "command fields")) {
        return;
    }
    if (command.len != strlen("filterstats") || memcmp(command.ptr, "filterstats", command.len) != 0) {
        return;
    }
    char text[160];
    int n = snprintf(text, sizeof text, "chat filter: %" PRIu64 " blocked, %" PRIu64 " rewritten, %" PRIu64 " passed",
                     f->cancelled, f->rewritten, f->passed);
    check(f, plugbus_send_chat(f->plugin, player.ptr, player.len, text, (size_t)n), "send_chat");
}

static void on_event(void *user, plugbus_event *event) {
    filter *f = user;
    int32_t type = 0;
    if (check(f, plugbus_event_type(event, &type), "event type")) {
        return;
    }
    if (type == PLUGBUS_EVENT_CHAT) {
        on_chat(f, event);
    } else if (type == PLUGBUS_EVENT_COMMAND) {
        on_command(f, event);
    }
}

static void lowercase(char *s) {
    for (; *s; s++) {
        *s = (char)tolower((unsigned char)*s);
    }
}

static void set_word(char *dst, size_t cap, const char *src, int lower) {
    snprintf(dst, cap, "%s", src);
    if (lower) {
        lowercase(dst);
    }
}

static void write_summary(const filter *f, const char *how) {
    const char *path = getenv("PLUGBUS_SUMMARY_FILE");
    if (!path) {
        return;
    }
    FILE *out = fopen(path, "w");
    if (!out) {
        perror("chat_filter: PLUGBUS_SUMMARY_FILE");
        return;
    }
    fprintf(out, "end=%s cancelled=%" PRIu64 " rewritten=%" PRIu64 " passed=%" PRIu64 " errors=%" PRIu64 "\n",
            how, f->cancelled, f->rewritten, f->passed, f->errors);
    fclose(out);
}

static int fail(plugbus_plugin *p, const char *what, plugbus_status rc) {
    fprintf(stderr, "chat_filter: %s: %s: %s\n", what, plugbus_status_name(rc), plugbus_last_error());
    plugbus_close(p);
    return 1;
}

int main(int argc, char **argv) {
    filter f = {0};
    set_word(f.banned, sizeof f.banned, "darn", 1);
    set_word(f.from, sizeof f.from, "heck", 1);
    set_word(f.to, sizeof f.to, "h*ck", 0);
    int32_t wait = PLUGBUS_WAIT_SPIN_THEN_PARK;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--banned") == 0 && i + 1 < argc) {
            set_word(f.banned, sizeof f.banned, argv[++i], 1);
        } else if (strcmp(argv[i], "--rewrite") == 0 && i + 1 < argc) {
            const char *v = argv[++i];
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) {
                fprintf(stderr, "chat_filter: --rewrite takes FROM=TO\n");
                return 1;
            }
            snprintf(f.from, sizeof f.from, "%.*s", (int)(eq - v), v);
            lowercase(f.from);
            set_word(f.to, sizeof f.to, eq + 1, 0);
        } else if (strcmp(argv[i], "--wait") == 0 && i + 1 < argc) {
            const char *w = argv[++i];
            wait = strcmp(w, "spin") == 0   ? PLUGBUS_WAIT_SPIN
                   : strcmp(w, "park") == 0 ? PLUGBUS_WAIT_PARK
                                            : PLUGBUS_WAIT_SPIN_THEN_PARK;
        } else {
            fprintf(stderr, "chat_filter: unknown argument \"%s\"\n", argv[i]);
            return 1;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    plugbus_status rc = plugbus_open_env(&f.plugin);
    if (rc != PLUGBUS_OK) {
        return fail(f.plugin, "open", rc);
    }
    const int32_t types[] = {PLUGBUS_EVENT_CHAT, PLUGBUS_EVENT_COMMAND};
    if ((rc = plugbus_hello(f.plugin, "chat_filter", "0.1.0")) != PLUGBUS_OK ||
        (rc = plugbus_register_command(f.plugin, "filterstats", "Shows what the chat filter did")) != PLUGBUS_OK ||
        (rc = plugbus_subscribe(f.plugin, types, sizeof types / sizeof types[0])) != PLUGBUS_OK ||
        (rc = plugbus_set_wait(f.plugin, wait)) != PLUGBUS_OK) {
        return fail(f.plugin, "configure", rc);
    }
    if ((rc = plugbus_connect(f.plugin)) != PLUGBUS_OK) {
        return fail(f.plugin, "connect", rc);
    }
    printf("chat_filter connected\n");

    plugbus_callbacks cb = {.user = &f, .on_event = on_event};
    while ((rc = plugbus_poll(f.plugin, &cb, 100)) == PLUGBUS_OK) {
    }
    int status = 0;
    if (rc == PLUGBUS_SHUTDOWN) {
        plugbus_str reason = {0};
        plugbus_shutdown_reason(f.plugin, &reason);
        printf("chat_filter stopping (%.*s): %" PRIu64 " blocked, %" PRIu64 " rewritten, %" PRIu64 " passed\n",
               (int)reason.len, reason.ptr, f.cancelled, f.rewritten, f.passed);
        write_summary(&f, "shutdown");
    } else {
        fprintf(stderr, "chat_filter: poll: %s: %s\n", plugbus_status_name(rc), plugbus_last_error());
        write_summary(&f, "error");
        status = 1;
    }
    plugbus_close(f.plugin);
    return status;
}
