/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The pod side: packets leaving a pod (from-container, tc ingress of the pod's
 * host-side device) and packets delivered into it (to-container, tc egress of
 * the same device, where ingress policy is enforced).
 */
#ifndef WEFT_LXC_H
#define WEFT_LXC_H

#include "ct.h"
#include "fib.h"
#include "lb.h"
#include "nat.h"
#include "policy.h"
#include "trace.h"

/* The packet goes to the node's proxy: marked so the node routes it to the local
 * table, where the sk_lookup program gives it to the proxy's listener. */
static __always_inline int redirect_to_proxy(struct __sk_buff *skb, const struct weft_config *cfg,
					     const struct pkt4 *p, int dir, __u8 seen,
					     __u16 proxy_port)
{
	struct trace_extra x = { .proxy_port = proxy_port };

	if (!proxy_port)
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_PROXY_LOOKUP_FAILED);
	mark_set(skb, WEFT_MARK_TO_PROXY);
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_TO_PROXY, dir, seen, &x);
	return TC_ACT_OK;
}

/* A connection to an L7 Service: no DNAT, the proxy sees the frontend as its
 * local address. */
static __always_inline int l7_connection(struct __sk_buff *skb, const struct weft_config *cfg,
					 const struct pkt4 *p, __u32 src_identity,
					 const struct weft_svc_val *svc, __u8 obs)
{
	struct weft_ct_key key;
	struct weft_ct_entry *ct, e;
	int dir = ct_lookup(p, &key, &ct);
	__u8 seen = 0;

	if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p)) {
		seen = ct_account(ct, dir, p);
	} else {
		dir = CT_NEW;
		ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
		ct_entry_init(&e, p, WEFT_CT_PROXY);
		e.proxy_port = svc->proxy_port;
		e.src_identity = src_identity;
		if (!ct_create(&key, &e))
			return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
	}
	trace_if(cfg, p, skb->ifindex, obs, dir, seen, 0);
	return redirect_to_proxy(skb, cfg, p, dir, seen, svc->proxy_port);
}

/* The backend of this connection: the one chosen before if it still exists,
 * else a new pick. Returns 0 when the service has no backend. */
static __always_inline struct weft_lb_entry *lb_backend(const struct weft_config *cfg,
							const struct pkt4 *p,
							const struct weft_svc_val *svc,
							struct weft_ct_key *lbkey, int *is_new)
{
	struct weft_lb_entry *lb, fresh;
	struct weft_backend *be;
	__u32 id = 0;

	ct_key_fwd(lbkey, p, WEFT_CT_SCOPE_SVC);
	lb = bpf_map_lookup_elem(&weft_lb, lbkey);
	if (lb) {
		be = backend_get(lb->backend_id);
		if (be && be->addr == lb->backend_addr && be->port == lb->backend_port) {
			*is_new = 0;
			if (now_ns() - lb->last_seen_ns > NSEC_PER_SEC)
				lb->last_seen_ns = now_ns();
			return lb;
		}
	}
	be = svc_pick_backend(p->daddr, p->dport, p->proto, svc, &id);
	if (!be)
		return 0;
	__builtin_memset(&fresh, 0, sizeof(fresh));
	fresh.last_seen_ns = now_ns();
	fresh.backend_id = id;
	fresh.backend_addr = be->addr;
	fresh.backend_port = be->port;
	fresh.svc_port = p->dport;
	*is_new = 1;
	if (bpf_map_update_elem(&weft_lb, lbkey, &fresh, BPF_ANY) < 0)
		return 0;
	return bpf_map_lookup_elem(&weft_lb, lbkey);
}

/* Pod -> Service frontend (ClusterIP, or a NodePort/external address reached
 * from inside): DNAT to a backend chosen per connection. */
static __always_inline int lxc_to_service(struct __sk_buff *skb, const struct weft_config *cfg,
					  struct pkt4 *p, const struct weft_endpoint *ep,
					  const struct weft_svc_val *svc)
{
	struct weft_ct_key lbkey, key;
	struct weft_ct_entry *ct, e;
	struct weft_lb_entry *lb;
	struct trace_extra x = { .flags = WEFT_EVF_XLATED_DST };
	int dir, is_new = 0, rc;
	__u8 seen = 0;

	if (svc->flags & WEFT_SVC_L7)
		return l7_connection(skb, cfg, p, ep->identity, svc, WEFT_OBS_FROM_ENDPOINT);
	if (!svc->count)
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_NO_SERVICE);
	lb = lb_backend(cfg, p, svc, &lbkey, &is_new);
	if (!lb)
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_NO_SERVICE);

	x.orig_addr = p->daddr;
	x.orig_port = p->dport;
	rc = nat_rewrite(skb, p, 0, lb->backend_addr, lb->backend_port);
	if (rc < 0)
		return DROP(cfg, p, skb->ifindex, -rc);

	dir = ct_lookup(p, &key, &ct);
	if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p)) {
		seen = ct_account(ct, dir, p);
	} else {
		dir = CT_NEW;
		ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
		ct_entry_init(&e, p, WEFT_CT_DNAT);
		e.rev_addr = x.orig_addr;
		e.rev_port = x.orig_port;
		e.src_identity = ep->identity;
		if (!ct_create(&key, &e))
			return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
	}
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_ENDPOINT, dir, seen, &x);
	return TC_ACT_OK;
}

/* from-container: everything a pod sends. */
static __always_inline int lxc_from_container(struct __sk_buff *skb, const struct weft_config *cfg,
					      struct pkt4 *p, const struct weft_endpoint *ep)
{
	struct weft_svc_val *svc;
	struct weft_ct_key key;
	struct weft_ct_entry *ct, e;
	int dir, rc;
	__u8 seen = 0;

	mark_set(skb, WEFT_MARK_SEEN);
	svc = svc_lookup(p->daddr, p->dport, p->proto);
	if (svc)
		return lxc_to_service(skb, cfg, p, ep, svc);

	dir = ct_lookup(p, &key, &ct);
	if (dir == CT_ESTABLISHED && ct_is_reopen(ct, p))
		dir = CT_NEW;
	if (dir == CT_NEW) {
		ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
		ct_entry_init(&e, p, 0);
		e.src_identity = ep->identity;
		if (!ct_create(&key, &e))
			return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
		trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_ENDPOINT, dir, 0, 0);
		return TC_ACT_OK;
	}

	seen = ct_account(ct, dir, p);
	if (dir == CT_REPLY && (ct->flags & WEFT_CT_NODEPORT) && (ct->flags & WEFT_CT_DNAT)) {
		/* A local backend answering a north-south client: restore the
		 * frontend as the source and send it out ourselves (the stack
		 * would refuse a forwarded packet from the node's own address). */
		struct trace_extra x = {
			.flags = WEFT_EVF_REVNAT,
			.orig_addr = p->saddr,
			.orig_port = p->sport,
		};

		rc = nat_rewrite(skb, p, 1, ct->rev_addr, ct->rev_port);
		if (rc < 0)
			return DROP(cfg, p, skb->ifindex, -rc);
		trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_ENDPOINT, dir, seen, &x);
		rc = fib_redirect(skb, p);
		if (rc < 0)
			return DROP(cfg, p, skb->ifindex, -rc);
		return rc;
	}
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_ENDPOINT, dir, seen, 0);
	return TC_ACT_OK;
}

/* to-container: delivery into a local pod. New connections pass ingress
 * policy; replies get the Service frontend restored as their source. */
static __always_inline int lxc_to_container(struct __sk_buff *skb, const struct weft_config *cfg,
					    struct pkt4 *p, const struct weft_endpoint *ep)
{
	struct weft_ct_key key;
	struct weft_ct_entry *ct, e;
	struct policy_result r;
	__u32 src_identity;
	int dir, rc;
	__u8 seen = 0;

	dir = ct_lookup(p, &key, &ct);
	if (dir == CT_REPLY) {
		struct trace_extra x = {};

		seen = ct_account(ct, dir, p);
		if (ct->flags & WEFT_CT_DNAT) {
			x.flags = WEFT_EVF_REVNAT;
			x.orig_addr = p->saddr;
			x.orig_port = p->sport;
			rc = nat_rewrite(skb, p, 1, ct->rev_addr, ct->rev_port);
			if (rc < 0)
				return DROP(cfg, p, skb->ifindex, -rc);
		}
		trace_if(cfg, p, skb->ifindex, WEFT_OBS_TO_ENDPOINT, dir, seen, &x);
		return TC_ACT_OK;
	}
	if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p) && (ct->flags & WEFT_CT_INGRESS_OK)) {
		seen = ct_account(ct, dir, p);
		trace_if(cfg, p, skb->ifindex, WEFT_OBS_TO_ENDPOINT, dir, seen, 0);
		return TC_ACT_OK;
	}

	/* First packet of the connection at this pod's door. */
	src_identity = ipcache_identity(p->saddr);
	if (src_identity == WEFT_ID_HOST && cfg && (cfg->flags & WEFT_CFG_ALLOW_HOST_INGRESS)) {
		r.action = WEFT_POLICY_ALLOW;
		r.match = WEFT_MATCH_NONE;
		r.enforced = 0;
		r.rule_id = 0;
	} else {
		policy_check(ep, src_identity, p, WEFT_DIR_INGRESS, &r);
	}
	if (r.enforced)
		emit_policy_verdict(cfg, p, skb->ifindex, ep, src_identity, WEFT_DIR_INGRESS, &r);
	if (r.action != WEFT_POLICY_ALLOW)
		return DROP(cfg, p, skb->ifindex,
			    r.match == WEFT_MATCH_NONE ? WEFT_DROP_POLICY_DENIED : WEFT_DROP_POLICY_DENY);

	if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p)) {
		/* Opened on this node (a local client): now admitted here too. */
		ct->flags |= WEFT_CT_INGRESS_OK;
		seen = ct_account(ct, dir, p);
	} else {
		ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
		ct_entry_init(&e, p, WEFT_CT_INGRESS_OK);
		e.src_identity = src_identity;
		if (!ct_create(&key, &e))
			return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
	}
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_TO_ENDPOINT, CT_NEW, seen, 0);
	return TC_ACT_OK;
}

/* Pods: IPv6 is dropped, since this datapath cannot enforce policy on it. */
#define LXC_NON_IPV4 TC_ACT_SHOT

/* tc ingress of a pod's device: what the pod sends. */
static __always_inline int handle_from_container(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct weft_endpoint *ep;
	struct pkt4 p;
	int rc = hook_parse(skb, cfg, &p, LXC_NON_IPV4);

	if (rc >= 0)
		return rc;
	ep = bpf_map_lookup_elem(&weft_endpoints, &p.saddr);
	if (!ep)
		return DROP(cfg, &p, skb->ifindex, WEFT_DROP_INVALID_SOURCE_IP);
	return lxc_from_container(skb, cfg, &p, ep);
}

/* tc egress of a pod's device: what is delivered into the pod. */
static __always_inline int handle_to_container(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct weft_endpoint *ep;
	struct pkt4 p;
	int rc = hook_parse(skb, cfg, &p, LXC_NON_IPV4);

	if (rc >= 0)
		return rc;
	ep = bpf_map_lookup_elem(&weft_endpoints, &p.daddr);
	if (!ep)
		return TC_ACT_OK; /* not addressed to the pod: nothing of ours */
	return lxc_to_container(skb, cfg, &p, ep);
}

#endif /* WEFT_LXC_H */
