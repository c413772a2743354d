/* SPDX-License-Identifier: Apache-2.0 */
/*
 * L3/L4 policy of a local endpoint, in both directions: the peer's identity,
 * the protocol and the destination port, as the packet is after any Service
 * translation (egress is judged on the backend, not the frontend).
 *
 * The weft_policy trie answers two questions per packet: the most specific
 * entry for this peer, and the most specific entry for any peer. A deny from
 * either wins; among allows the more specific protocol/port match wins, and
 * the peer's own entry wins a tie. Userspace folds everything else (a deny of
 * a wider range shadowing a narrower allow of the same peer) into the entries
 * it writes, so two lookups decide.
 */
#ifndef WEFT_POLICY_H
#define WEFT_POLICY_H

#include "events.h"
#include "nat.h"

struct policy_result {
	__u8 action;     /* WEFT_POLICY_* */
	__u8 match;      /* WEFT_MATCH_* */
	__u8 enforced;   /* a policy selects the endpoint in this direction */
	__u16 proxy_port; /* allowed through the node's proxy on this port (host order) */
	__u32 rule_id;
};

/* One lookup, copied out of the map (action 0: no entry). Scalars rather than
 * map pointers let the compiler keep both lookups in registers. */
struct policy_hit {
	__u8 action;
	__u8 prefixlen;
	__u16 proxy_port;
	__u32 rule_id;
};

static __always_inline struct policy_hit policy_get(__u16 ep_id, __u8 dir, __u32 identity, __u8 proto,
						   __u16 dport)
{
	struct weft_policy_key key = {
		.prefixlen = WEFT_POLICY_PREFIX_FULL,
		.ep_id = ep_id,
		.direction = dir,
		.identity = identity,
		.proto = proto,
		.dport = dport,
	};
	struct weft_policy_val *v = bpf_map_lookup_elem(&weft_policy, &key);
	struct policy_hit hit = {};

	if (v) {
		hit.action = v->action;
		hit.prefixlen = v->prefixlen;
		hit.proxy_port = v->proxy_port;
		hit.rule_id = v->rule_id;
	}
	return hit;
}

/* How specific the deciding entry was, in Hubble's terms. */
static __always_inline __u8 policy_match_of(int own_peer, __u8 prefixlen)
{
	if (prefixlen <= WEFT_POLICY_PREFIX_FIXED)
		return own_peer ? WEFT_MATCH_L3_ONLY : WEFT_MATCH_ALL;
	if (prefixlen <= WEFT_POLICY_PREFIX_PROTO)
		return own_peer ? WEFT_MATCH_L3_PROTO : WEFT_MATCH_PROTO_ONLY;
	return own_peer ? WEFT_MATCH_L3_L4 : WEFT_MATCH_L4_ONLY;
}

static __always_inline void policy_take(struct policy_result *r, const struct policy_hit *h, int own_peer)
{
	r->action = h->action;
	r->match = policy_match_of(own_peer, h->prefixlen);
	r->rule_id = h->rule_id;
	r->proxy_port = h->action == WEFT_POLICY_ALLOW ? h->proxy_port : 0;
}

/* The port a policy entry matches: none for protocols without ports (an ICMP
 * echo's identifier is not a port). */
static __always_inline __u16 policy_port(const struct pkt4 *p)
{
	return has_ports(p) ? p->dport : 0;
}

/* Decides a new connection between local endpoint (ep_id, ep_flags) and a
 * peer, in direction dir. An endpoint no policy selects in that direction
 * allows everything; otherwise nothing matching means deny (match NONE). */
static __always_inline void policy_check(__u16 ep_id, __u8 ep_flags, __u32 peer, const struct pkt4 *p,
					 __u8 dir, struct policy_result *r)
{
	__u8 flag = dir == WEFT_DIR_INGRESS ? WEFT_EP_POLICY_INGRESS : WEFT_EP_POLICY_EGRESS;
	struct policy_hit own = {}, any;
	__u16 port = policy_port(p);

	r->enforced = (ep_flags & flag) != 0;
	r->rule_id = 0;
	r->proxy_port = 0;
	r->match = WEFT_MATCH_NONE;
	r->action = r->enforced ? WEFT_POLICY_DENY : WEFT_POLICY_ALLOW;
	if (!r->enforced)
		return;

	if (peer)
		own = policy_get(ep_id, dir, peer, p->proto, port);
	any = policy_get(ep_id, dir, 0, p->proto, port);

	if (own.action == WEFT_POLICY_DENY)
		policy_take(r, &own, 1);
	else if (any.action == WEFT_POLICY_DENY)
		policy_take(r, &any, 0);
	else if (own.action == WEFT_POLICY_ALLOW && (!any.action || own.prefixlen >= any.prefixlen))
		policy_take(r, &own, 1);
	else if (any.action == WEFT_POLICY_ALLOW)
		policy_take(r, &any, 0);
}

/* A policy-verdict record. For ingress the endpoint is the destination and
 * the peer the source; for egress the other way round. */
static __always_inline void emit_policy_verdict(const struct weft_config *cfg, const struct pkt4 *p,
						__u32 ifindex, const struct weft_endpoint *ep, __u32 peer,
						__u8 dir, const struct policy_result *r)
{
	struct weft_event *ev = event_init(WEFT_EV_POLICY, r->action, p, ifindex);

	if (!ev)
		return;
	if (dir == WEFT_DIR_INGRESS) {
		ev->src_identity = peer;
		ev->dst_identity = ep->identity;
		ev->dst_ep = ep->ep_id;
	} else {
		ev->src_identity = ep->identity;
		ev->src_ep = ep->ep_id;
		ev->dst_identity = peer;
	}
	ev->policy_match = r->match;
	ev->direction = dir;
	ev->rule_id = r->rule_id;
	ev->proxy_port = r->proxy_port;
	event_submit(cfg, ev);
}

/* Judges a new connection of local endpoint ep with a peer: reports the
 * verdict when a policy selects the endpoint, and returns 0 if allowed (r
 * tells whether through the proxy), else TC_ACT_SHOT after reporting the drop
 * (POLICY_DENIED when nothing allowed it, POLICY_DENY for an explicit deny). */
static __always_inline int policy_enforce(const struct weft_config *cfg, const struct pkt4 *p, __u32 ifindex,
					  const struct weft_endpoint *ep, __u32 peer, __u8 dir,
					  struct policy_result *r)
{
	policy_check(ep->ep_id, ep->flags, peer, p, dir, r);
	if (r->enforced)
		emit_policy_verdict(cfg, p, ifindex, ep, peer, dir, r);
	if (r->action == WEFT_POLICY_ALLOW)
		return 0;
	return DROP_DIR(cfg, p, ifindex,
			r->match == WEFT_MATCH_NONE ? WEFT_DROP_POLICY_DENIED : WEFT_DROP_POLICY_DENY, dir);
}

/* Judges a new connection of the node itself (host policies): `dir` is
 * the node's direction (ingress: the peer opened it to a node address;
 * egress: the node opened it). The node is the endpoint WEFT_HOST_EP_ID,
 * under default-deny in the directions weft_config.host_policy says; with
 * no host policy it allows everything and reports nothing. Returns 0 if
 * allowed, else TC_ACT_SHOT after reporting the verdict and the drop. */
static __always_inline int host_policy_enforce(const struct weft_config *cfg, const struct pkt4 *p, __u32 ifindex,
					       __u32 peer, __u8 dir)
{
	struct weft_endpoint host = {
		.identity = WEFT_ID_HOST,
		.ep_id = WEFT_HOST_EP_ID,
	};
	struct policy_result r;

	if (!cfg || !cfg->host_policy)
		return 0;
	host.flags = cfg->host_policy;
	return policy_enforce(cfg, p, ifindex, &host, peer, dir, &r);
}

/* Judges a new connection the node opens (host egress; `peer` is the
 * destination's identity), except one of the node's proxy's upstream
 * connections (WEFT_MARK_FROM_PROXY): what it carries was judged where it
 * entered the proxy (the client's egress, L7 rules in the proxy), and the
 * pod it reaches judges it by its own ingress, as Cilium exempts its
 * proxy's upstreams from the host firewall. Returns 0 if it may go on. */
static __always_inline int host_egress_enforce(const struct weft_config *cfg, const struct __sk_buff *skb,
					       const struct pkt4 *p, __u32 peer)
{
	if ((skb->mark & WEFT_MARK_MASK) == WEFT_MARK_FROM_PROXY)
		return 0;
	return host_policy_enforce(cfg, p, skb->ifindex, peer, WEFT_DIR_EGRESS);
}

#endif /* WEFT_POLICY_H */
