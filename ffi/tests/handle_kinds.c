/*
 * handle_kinds.c: a C plugin that passes every kind of wrong handle to the C API and checks
 * that each call returns its error code (and plugbus_last_error says why) instead of reading
 * memory of the wrong type: an event handle to connection and host functions, a connection
 * handle to event accessors and host functions, a host handle to plugin functions and event
 * accessors, closed (stale) handles of each kind, made-up pointers, NULL. Run by
 * tests/ffi_c.rs natively and under valgrind memcheck (which must report no error).
 *
 * Started by a plugbus host (PLUGBUS_ADDRESS / PLUGBUS_SEGMENT and PLUGBUS_PLUGIN_ID). It
 * answers a chat containing "probe" with a cancel once its checks inside the callback passed,
 * and writes "end=<how> checks=<n> failures=<n>" to PLUGBUS_SUMMARY_FILE on exit.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugbus.h"

static unsigned checks, failures;

/* Checks that `got` is `want` and, for an error, that the last error mentions `needle`. */
static void expect(int line, const char *what, plugbus_status got, plugbus_status want, const char *needle) {
    checks++;
    const char *err = plugbus_last_error();
    if (got != want || (want < 0 && needle && !strstr(err, needle))) {
        failures++;
        printf("handle_kinds: FAIL line %d: %s: got %s (\"%s\"), want %s mentioning \"%s\"\n", line, what,
               plugbus_status_name(got), err, plugbus_status_name(want), needle ? needle : "");
    }
}
#define EXPECT(call, want, needle) expect(__LINE__, #call, (call), (want), (needle))

typedef struct {
    plugbus_plugin *plugin;
    plugbus_host *host;
    plugbus_event *saved;
    int probed;
} state;

/* The made-up pointers every function must refuse without reading through them. */
static uint64_t some_memory[8];

static void *made_up(int i) {
    switch (i) {
    case 0:
        return some_memory; /* readable memory that is no handle */
    case 1:
        return (void *)(uintptr_t)0x1234; /* unmapped */
    case 2:
        return (void *)(uintptr_t)UINTPTR_MAX; /* not even canonical */
    default:
        return (void *)(uintptr_t)0x5001fffffffffff0ull; /* shaped like a handle, never opened */
    }
}

/* Handles of every wrong kind, made-up pointers and NULL, passed to functions of each kind
 * (`ev` is the event being handled, or NULL outside a callback). */
static void refused_everywhere(state *s, plugbus_event *ev) {
    plugbus_str str;
    int32_t type;
    uint64_t tick;

    /* Plugin functions. */
    EXPECT(plugbus_set_wait((plugbus_plugin *)s->host, PLUGBUS_WAIT_PARK), PLUGBUS_ERR_CLOSED,
           "this is a plugbus host handle");
    EXPECT(plugbus_send_chat((plugbus_plugin *)s->host, NULL, 0, "x", 1), PLUGBUS_ERR_CLOSED,
           "this is a plugbus host handle");
    EXPECT(plugbus_close((plugbus_plugin *)s->host), PLUGBUS_ERR_CLOSED, "this is a plugbus host handle");
    if (ev) {
        EXPECT(plugbus_send_chat((plugbus_plugin *)ev, NULL, 0, "x", 1), PLUGBUS_ERR_CLOSED,
               "this is a plugbus event handle");
        EXPECT(plugbus_log((plugbus_plugin *)ev, "info", "x", 1), PLUGBUS_ERR_CLOSED,
               "this is a plugbus event handle");
        EXPECT(plugbus_shutdown_reason((plugbus_plugin *)ev, &str), PLUGBUS_ERR_CLOSED,
               "this is a plugbus event handle");
        EXPECT(plugbus_close((plugbus_plugin *)ev), PLUGBUS_ERR_CLOSED, "this is a plugbus event handle");
    }
    EXPECT(plugbus_set_wait(NULL, PLUGBUS_WAIT_PARK), PLUGBUS_ERR_NULL_POINTER, "is NULL");

    /* Event accessors and reply helpers. */
    EXPECT(plugbus_event_type((plugbus_event *)s->plugin, &type), PLUGBUS_ERR_CLOSED,
           "this is a plugbus plugin handle");
    EXPECT(plugbus_reply_cancel((plugbus_event *)s->plugin), PLUGBUS_ERR_CLOSED, "this is a plugbus plugin handle");
    EXPECT(plugbus_event_id((plugbus_event *)s->host, &str), PLUGBUS_ERR_CLOSED, "this is a plugbus host handle");
    EXPECT(plugbus_event_chat((plugbus_event *)s->host, &str, NULL, NULL), PLUGBUS_ERR_CLOSED,
           "this is a plugbus host handle");
    EXPECT(plugbus_event_type(NULL, &type), PLUGBUS_ERR_NULL_POINTER, "is NULL");

    /* Host functions. */
    EXPECT(plugbus_host_begin_tick((plugbus_host *)s->plugin, &tick), PLUGBUS_ERR_CLOSED,
           "this is a plugbus plugin handle");
    EXPECT(plugbus_host_metrics((plugbus_host *)s->plugin, &str), PLUGBUS_ERR_CLOSED,
           "this is a plugbus plugin handle");
    EXPECT(plugbus_host_shutdown((plugbus_host *)s->plugin, NULL, 0), PLUGBUS_ERR_CLOSED,
           "this is a plugbus plugin handle");
    if (ev) {
        EXPECT(plugbus_host_end_tick((plugbus_host *)ev), PLUGBUS_ERR_CLOSED, "this is a plugbus event handle");
    }
    EXPECT(plugbus_host_begin_tick(NULL, &tick), PLUGBUS_ERR_NULL_POINTER, "is NULL");

    /* Made-up pointers, for each kind. */
    for (int i = 0; i < 4; i++) {
        EXPECT(plugbus_hello((plugbus_plugin *)made_up(i), "n", "1"), PLUGBUS_ERR_CLOSED, "plugin handle");
        EXPECT(plugbus_close((plugbus_plugin *)made_up(i)), PLUGBUS_ERR_CLOSED, "plugin handle");
        EXPECT(plugbus_event_type((plugbus_event *)made_up(i), &type), PLUGBUS_ERR_CLOSED, "event handle");
        EXPECT(plugbus_reply_ack((plugbus_event *)made_up(i)), PLUGBUS_ERR_CLOSED, "event handle");
        EXPECT(plugbus_host_end_tick((plugbus_host *)made_up(i)), PLUGBUS_ERR_CLOSED, "host handle");
        EXPECT(plugbus_host_shutdown((plugbus_host *)made_up(i), NULL, 0), PLUGBUS_ERR_CLOSED, "host handle");
    }
}

static void on_event(void *user, plugbus_event *ev) {
    state *s = user;
    plugbus_str player, name, message;
    if (plugbus_event_chat(ev, &player, &name, &message) != PLUGBUS_OK || message.len < 5 ||
        memcmp(message.ptr, "probe", 5) != 0) {
        return;
    }
    refused_everywhere(s, ev);
    /* The real event still works after all that. */
    int32_t type = 0;
    EXPECT(plugbus_event_type(ev, &type), PLUGBUS_OK, NULL);
    if (type != PLUGBUS_EVENT_CHAT) {
        failures++;
    }
    s->saved = ev;
    s->probed++;
    if (failures == 0) {
        EXPECT(plugbus_reply_cancel(ev), PLUGBUS_OK, NULL);
    }
}

static void write_summary(const char *how) {
    const char *path = getenv("PLUGBUS_SUMMARY_FILE");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) {
        fprintf(f, "end=%s checks=%u failures=%u\n", how, checks, failures);
        fclose(f);
    }
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    state s = {0};
    const char *toml = "[host]\nresponse_timeout_ms = 100\n";
    EXPECT(plugbus_host_start(toml, strlen(toml), &s.host), PLUGBUS_OK, NULL);
    plugbus_status rc = plugbus_open_env(&s.plugin);
    EXPECT(rc, PLUGBUS_OK, NULL);
    const int32_t types[] = {PLUGBUS_EVENT_CHAT};
    EXPECT(plugbus_hello(s.plugin, "handle_kinds", "0.1.0"), PLUGBUS_OK, NULL);
    EXPECT(plugbus_subscribe(s.plugin, types, 1), PLUGBUS_OK, NULL);
    if (rc != PLUGBUS_OK || s.host == NULL) {
        write_summary("error");
        return 1;
    }

    /* Before connecting: no event exists yet. */
    refused_everywhere(&s, NULL);

    /* A closed plugin handle stays stale, also once a newer handle took its slot. */
    plugbus_plugin *old = NULL, *newer = NULL;
    EXPECT(plugbus_open("plugbus.handle-kinds-nowhere", "old", &old), PLUGBUS_OK, NULL);
    EXPECT(plugbus_close(old), PLUGBUS_OK, NULL);
    EXPECT(plugbus_open("plugbus.handle-kinds-nowhere", "newer", &newer), PLUGBUS_OK, NULL);
    EXPECT(plugbus_set_wait(old, PLUGBUS_WAIT_PARK), PLUGBUS_ERR_CLOSED, "stale plugin handle");
    EXPECT(plugbus_close(old), PLUGBUS_ERR_CLOSED, "stale plugin handle");
    EXPECT(plugbus_set_wait(newer, PLUGBUS_WAIT_PARK), PLUGBUS_OK, NULL);
    EXPECT(plugbus_close(newer), PLUGBUS_OK, NULL);

    if ((rc = plugbus_connect(s.plugin)) != PLUGBUS_OK) {
        printf("handle_kinds: connect: %s: %s\n", plugbus_status_name(rc), plugbus_last_error());
        write_summary("error");
        return 1;
    }
    printf("handle_kinds connected\n");

    plugbus_callbacks cb = {.user = &s, .on_event = on_event};
    while ((rc = plugbus_poll(s.plugin, &cb, 100)) == PLUGBUS_OK) {
        if (s.probed == 1 && s.host) {
            /* After its callback: the event is refused (not stale yet, its handle is open). */
            int32_t type;
            EXPECT(plugbus_event_type(s.saved, &type), PLUGBUS_ERR_BAD_STATE, "only during its on_event");
            EXPECT(plugbus_reply_ack(s.saved), PLUGBUS_ERR_BAD_STATE, "only during its on_event");
            /* A shut-down host is stale. */
            plugbus_host *h = s.host;
            EXPECT(plugbus_host_shutdown(h, "bye", 3), PLUGBUS_OK, NULL);
            EXPECT(plugbus_host_begin_tick(h, NULL), PLUGBUS_ERR_CLOSED, "stale host handle");
            EXPECT(plugbus_host_shutdown(h, NULL, 0), PLUGBUS_ERR_CLOSED, "stale host handle");
            EXPECT(plugbus_set_wait((plugbus_plugin *)h, PLUGBUS_WAIT_PARK), PLUGBUS_ERR_CLOSED,
                   "this is a plugbus host handle");
            s.host = NULL;
            printf("handle_kinds probed: %u checks, %u failures\n", checks, failures);
        }
    }
    const char *how = rc == PLUGBUS_SHUTDOWN ? "shutdown" : "error";
    if (rc != PLUGBUS_SHUTDOWN) {
        printf("handle_kinds: poll: %s: %s\n", plugbus_status_name(rc), plugbus_last_error());
    }
    plugbus_plugin *p = s.plugin;
    EXPECT(plugbus_close(p), PLUGBUS_OK, NULL);
    /* Closed: the handle and its event are stale. */
    int32_t type;
    EXPECT(plugbus_set_wait(p, PLUGBUS_WAIT_PARK), PLUGBUS_ERR_CLOSED, "stale plugin handle");
    EXPECT(plugbus_poll(p, &cb, 0), PLUGBUS_ERR_CLOSED, "stale plugin handle");
    EXPECT(plugbus_close(p), PLUGBUS_ERR_CLOSED, "stale plugin handle");
    if (s.saved) {
        EXPECT(plugbus_event_type(s.saved, &type), PLUGBUS_ERR_CLOSED, "stale event handle");
        EXPECT(plugbus_reply_cancel(s.saved), PLUGBUS_ERR_CLOSED, "stale event handle");
    }
    if (s.host) {
        plugbus_host_shutdown(s.host, NULL, 0);
    }
    printf("handle_kinds stopping: %u checks, %u failures\n", checks, failures);
    write_summary(how);
    return failures == 0 && rc == PLUGBUS_SHUTDOWN ? 0 : 1;
}
