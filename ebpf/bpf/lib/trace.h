/* SPDX-License-Identifier: Apache-2.0 */
/* Trace records: where a packet was seen and what was decided. */
#ifndef WEFT_TRACE_H
#define WEFT_TRACE_H

#include "ct.h"
#include "events.h"

/* Optional extras of a trace record; zero means "not set". */
struct trace_extra {
	__u8 flags;      /* WEFT_EVF_* */
	__u16 orig_port;
	__u16 proxy_port;
	__u16 nat_port;
	__u32 orig_addr;
	__u32 nat_addr;
};

static __always_inline void emit_trace(const struct weft_config *cfg, const struct pkt4 *p,
				       __u32 ifindex, __u8 obs, __u8 reason,
				       const struct trace_extra *x)
{
	struct weft_event *ev = event_init(WEFT_EV_TRACE, obs, p, ifindex);

	if (!ev)
		return;
	ev->reason = reason;
	if (reason == WEFT_REASON_REPLY)
		ev->flags |= WEFT_EVF_REPLY;
	if (x) {
		ev->flags |= x->flags;
		ev->orig_addr = x->orig_addr;
		ev->orig_port = x->orig_port;
		ev->proxy_port = x->proxy_port;
		ev->nat_addr = x->nat_addr;
		ev->nat_port = x->nat_port;
		/* A reverse-translated reply comes from the backend, not from the
		 * Service address it now carries. */
		if (x->flags & WEFT_EVF_REVNAT)
			ev->src_identity = ipcache_identity(x->orig_addr);
	}
	event_submit(cfg, ev);
}

/* Why a packet is where it is. A TCP SYN without ACK opens its connection at
 * every hook it passes, even where the connection was tracked a hop earlier. */
static __always_inline __u8 reason_of(int dir, const struct pkt4 *p)
{
	if (dir == CT_ESTABLISHED && p->proto == IPPROTO_TCP &&
	    (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
		return WEFT_REASON_NEW;
	switch (dir) {
	case CT_ESTABLISHED:
		return WEFT_REASON_ESTABLISHED;
	case CT_REPLY:
		return WEFT_REASON_REPLY;
	default:
		return WEFT_REASON_NEW;
	}
}

/* Trace if the emission level wants this packet. */
static __always_inline void trace_if(const struct weft_config *cfg, const struct pkt4 *p,
				     __u32 ifindex, __u8 obs, int dir, __u8 seen,
				     const struct trace_extra *x)
{
	if (emit_wanted(cfg, dir == CT_NEW, p, seen))
		emit_trace(cfg, p, ifindex, obs, reason_of(dir, p), x);
}

/* Parses the packet at a hook. Returns -1 to go on with *p, or the TC action
 * for packets that end here: `non_ipv4` for what is not IPv4 (ARP always
 * passes), TC_ACT_SHOT with a drop record for malformed IPv4. */
static __always_inline int hook_parse(struct __sk_buff *skb, const struct weft_config *cfg, struct pkt4 *p,
				      int non_ipv4)
{
	int rc;

	__builtin_memset(p, 0, sizeof(*p));
	rc = parse_ipv4(skb, p);
	if (rc == PARSE_NOT_IPV4) {
		if (non_ipv4 == TC_ACT_OK || skb->protocol == bpf_htons(ETH_P_ARP))
			return TC_ACT_OK;
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_UNKNOWN_L3);
	}
	if (rc < 0)
		return DROP(cfg, p, skb->ifindex, -rc);
	return -1;
}

static __always_inline void mark_set(struct __sk_buff *skb, __u32 magic)
{
	skb->mark = (skb->mark & ~WEFT_MARK_MASK) | magic;
}

#endif /* WEFT_TRACE_H */
