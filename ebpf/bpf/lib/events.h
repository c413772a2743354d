/* SPDX-License-Identifier: Apache-2.0 */
/* Verdict records into the weft_events ring buffer, with loss accounting. */
#ifndef WEFT_EVENTS_H
#define WEFT_EVENTS_H

#include "maps.h"

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&weft_event_stats, &idx);

	if (v)
		*v += 1; /* per-CPU slot: no other writer */
}

/* Identity of any address: the longest ipcache prefix, else "world". */
static __always_inline __u32 ipcache_identity(__u32 addr)
{
	struct weft_ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct weft_ipcache_val *v = bpf_map_lookup_elem(&weft_ipcache, &key);

	return v ? v->identity : WEFT_ID_WORLD;
}

static __always_inline __u16 endpoint_id(__u32 addr)
{
	struct weft_endpoint *ep = bpf_map_lookup_elem(&weft_endpoints, &addr);

	return ep ? ep->ep_id : 0;
}

/* Does this packet deserve a record at the configured level?
 * new_conn: the hook saw no state for it; seen: TCP flags already seen in this
 * direction before this packet (only meaningful for TCP). */
static __always_inline int emit_wanted(const struct weft_config *cfg, int new_conn,
				       const struct pkt4 *p, __u8 seen)
{
	__u32 level = cfg ? cfg->emit_level : WEFT_EMIT_CONN;

	if (level == WEFT_EMIT_OFF)
		return 0;
	if (level >= WEFT_EMIT_ALL || new_conn)
		return 1;
	if (p->proto != IPPROTO_TCP)
		return 0;
	if (p->tcp_flags & (TCPF_SYN | TCPF_FIN | TCPF_RST))
		return 1;
	return (p->tcp_flags & ~seen) != 0;
}

/* Starts a record from a parsed packet, in the per-CPU scratch slot; identities
 * and endpoint ids left at 0 are resolved from the maps when it is written. */
static __always_inline struct weft_event *event_init(__u8 type, __u8 subtype,
						     const struct pkt4 *p, __u32 ifindex)
{
	__u32 zero = 0;
	struct weft_event *ev = bpf_map_lookup_elem(&weft_event_scratch, &zero);

	if (!ev)
		return 0;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = now_ns();
	ev->type = type;
	ev->subtype = subtype;
	ev->ifindex = ifindex;
	ev->saddr = p->saddr;
	ev->daddr = p->daddr;
	ev->sport = p->sport;
	ev->dport = p->dport;
	ev->proto = p->proto;
	ev->tcp_flags = p->tcp_flags;
	ev->pkt_len = p->len;
	return ev;
}

#ifdef WEFT_UNIT_TEST
/* A check program cannot read the ring buffer, so unit-test builds also keep
 * the last records in an array the checks read (ebpf/tests/unit.h). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct weft_event);
} unit_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} unit_event_count SEC(".maps");

static __always_inline void unit_record_event(const struct weft_event *ev)
{
	__u32 zero = 0, *n = bpf_map_lookup_elem(&unit_event_count, &zero), slot;

	if (!n)
		return;
	slot = *n & 15;
	bpf_map_update_elem(&unit_events, &slot, ev, BPF_ANY);
	*n += 1;
}
#endif

static __always_inline void event_submit(const struct weft_config *cfg, struct weft_event *ev)
{
	if (cfg && cfg->emit_level == WEFT_EMIT_OFF)
		return;
	if (!ev->src_identity)
		ev->src_identity = ipcache_identity(ev->saddr);
	if (!ev->dst_identity)
		ev->dst_identity = ipcache_identity(ev->daddr);
	if (!ev->src_ep)
		ev->src_ep = endpoint_id(ev->saddr);
	if (!ev->dst_ep)
		ev->dst_ep = endpoint_id(ev->daddr);
#ifdef WEFT_UNIT_TEST
	unit_record_event(ev);
#endif
	if (bpf_ringbuf_output(&weft_events, ev, sizeof(*ev), 0) == 0)
		stat_inc(WEFT_STAT_EMITTED);
	else
		stat_inc(WEFT_STAT_LOST);
}

/* A drop is always worth a record unless emission is off. `dir` says which
 * way policy judged the packet (WEFT_DIR_*), 0 when no policy did. */
static __always_inline void emit_drop_dir(const struct weft_config *cfg, const struct pkt4 *p,
					  __u32 ifindex, __u8 reason, __u32 line, __u8 dir)
{
	struct weft_event *ev = event_init(WEFT_EV_DROP, reason, p, ifindex);

	if (!ev)
		return;
	ev->drop_line = line;
	ev->direction = dir;
	event_submit(cfg, ev);
}

static __always_inline void emit_drop(const struct weft_config *cfg, const struct pkt4 *p,
				      __u32 ifindex, __u8 reason, __u32 line)
{
	emit_drop_dir(cfg, p, ifindex, reason, line, 0);
}

#define DROP(cfg, p, ifindex, reason) \
	({ emit_drop(cfg, p, ifindex, reason, __LINE__); TC_ACT_SHOT; })
#define DROP_DIR(cfg, p, ifindex, reason, dir) \
	({ emit_drop_dir(cfg, p, ifindex, reason, __LINE__, dir); TC_ACT_SHOT; })

#endif /* WEFT_EVENTS_H */
