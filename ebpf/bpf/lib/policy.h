/* SPDX-License-Identifier: Apache-2.0 */
/* L3/L4 ingress policy: identity of the peer, port, protocol. */
#ifndef WEFT_POLICY_H
#define WEFT_POLICY_H

#include "events.h"

struct policy_result {
	__u8 action; /* WEFT_POLICY_* */
	__u8 match;  /* WEFT_MATCH_* */
	__u8 enforced;
	__u32 rule_id;
};

/* One policy lookup, copied out of the map: action 0 means no entry. Keeping
 * scalars (not map pointers) lets the compiler choose among them freely. */
struct policy_hit {
	__u8 action;
	__u32 rule_id;
};

static __always_inline struct policy_hit policy_get(__u16 ep_id, __u32 identity, __u16 dport,
						   __u8 proto, __u8 dir)
{
	struct weft_policy_key key = {
		.identity = identity,
		.ep_id = ep_id,
		.dport = dport,
		.proto = proto,
		.direction = dir,
	};
	struct weft_policy_val *v = bpf_map_lookup_elem(&weft_policy, &key);
	struct policy_hit hit = {};

	if (v) {
		hit.action = v->action;
		hit.rule_id = v->rule_id;
	}
	return hit;
}

/* Decides whether a new connection from src_identity may reach the endpoint.
 * An endpoint no policy selects allows everything. Otherwise a deny at any
 * level wins over allows, the most specific matching entry decides among
 * equals, and nothing matching means deny (match NONE). */
static __always_inline void policy_check(const struct weft_endpoint *ep, __u32 src_identity,
					 const struct pkt4 *p, __u8 dir, struct policy_result *r)
{
	struct policy_hit hits[4];
	const __u8 matches[4] = { WEFT_MATCH_L3_L4, WEFT_MATCH_L3_ONLY, WEFT_MATCH_L4_ONLY,
				  WEFT_MATCH_ALL };
	int i;

	r->enforced = (ep->flags & WEFT_EP_POLICY_INGRESS) != 0;
	r->rule_id = 0;
	r->match = WEFT_MATCH_NONE;
	r->action = r->enforced ? WEFT_POLICY_DENY : WEFT_POLICY_ALLOW;
	if (!r->enforced)
		return;

	/* Most specific first. */
	hits[0] = policy_get(ep->ep_id, src_identity, p->dport, p->proto, dir);
	hits[1] = policy_get(ep->ep_id, src_identity, 0, 0, dir);
	hits[2] = policy_get(ep->ep_id, 0, p->dport, p->proto, dir);
	hits[3] = policy_get(ep->ep_id, 0, 0, 0, dir);

#pragma unroll
	for (i = 0; i < 4; i++) {
		if (hits[i].action == WEFT_POLICY_DENY) {
			r->action = WEFT_POLICY_DENY;
			r->match = matches[i];
			r->rule_id = hits[i].rule_id;
			return;
		}
	}
#pragma unroll
	for (i = 0; i < 4; i++) {
		if (hits[i].action == WEFT_POLICY_ALLOW) {
			r->action = WEFT_POLICY_ALLOW;
			r->match = matches[i];
			r->rule_id = hits[i].rule_id;
			return;
		}
	}
}

static __always_inline void emit_policy_verdict(const struct weft_config *cfg, const struct pkt4 *p,
						__u32 ifindex, const struct weft_endpoint *ep,
						__u32 src_identity, __u8 dir,
						const struct policy_result *r)
{
	struct weft_event *ev = event_init(WEFT_EV_POLICY, r->action, p, ifindex);

	if (!ev)
		return;
	ev->src_identity = src_identity;
	ev->dst_identity = ep->identity;
	ev->dst_ep = ep->ep_id;
	ev->policy_match = r->match;
	ev->direction = dir;
	ev->rule_id = r->rule_id;
	event_submit(cfg, ev);
}

#endif /* WEFT_POLICY_H */
