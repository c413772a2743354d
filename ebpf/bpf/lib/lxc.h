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

/* A reply of a connection DNATed to a backend gets the frontend back as its
 * source; the trace keeps the backend's address. Returns 0 or a negative
 * drop reason. */
static __always_inline int revnat_to_frontend(struct __sk_buff *skb, struct pkt4 *p,
					      const struct weft_ct_entry *ct, struct trace_extra *x)
{
	x->flags |= WEFT_EVF_REVNAT;
	x->orig_addr = p->saddr;
	x->orig_port = p->sport;
	return nat_rewrite(skb, p, 1, ct->rev_addr, ct->rev_port);
}

/* Ingress policy of a local destination that sends this peer's new
 * connection through the node's proxy (L7 rules): returns the proxy port,
 * after reporting the verdict, or 0 when the destination is not local, has
 * no such rule for the peer, or is to judge the connection on delivery
 * (allow or deny at L3/L4). Called where the packet enters the node, since
 * only there does the proxy mark still steer routing. */
static __always_inline __u16 ingress_proxy_port(const struct weft_config *cfg, const struct pkt4 *p,
						__u32 ifindex, __u32 src_identity)
{
	struct weft_endpoint *dst = bpf_map_lookup_elem(&weft_endpoints, &p->daddr);
	struct policy_result r;

	if (!dst || !(dst->flags & WEFT_EP_POLICY_INGRESS) || p->proto != IPPROTO_TCP)
		return 0;
	if (src_identity == WEFT_ID_HOST && cfg && (cfg->flags & WEFT_CFG_ALLOW_HOST_INGRESS))
		return 0;
	policy_check(dst->ep_id, dst->flags, src_identity, p, WEFT_DIR_INGRESS, &r);
	if (r.action != WEFT_POLICY_ALLOW || !r.proxy_port)
		return 0;
	emit_policy_verdict(cfg, p, ifindex, dst, src_identity, WEFT_DIR_INGRESS, &r);
	return r.proxy_port;
}

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

/* The backend an L7 Service's connection is judged against by the client's
 * egress policy: the proxy picks the real one later, so this takes the first
 * backend (the datapath cannot know the proxy's choice). None: the frontend
 * itself is the destination. */
static __always_inline void l7_policy_target(const struct pkt4 *p, const struct weft_svc_val *svc,
					     struct pkt4 *target)
{
	struct weft_svc_key key = { .addr = p->daddr, .port = p->dport, .slot = 1, .proto = p->proto };
	struct weft_svc_val *slot;
	struct weft_backend *be;

	*target = *p;
	if (!svc->count)
		return;
	slot = bpf_map_lookup_elem(&weft_services, &key);
	if (!slot)
		return;
	be = backend_get(slot->backend_id);
	if (!be)
		return;
	target->daddr = be->addr;
	target->dport = be->port;
}

/* A connection to an L7 Service: no DNAT, the proxy sees the frontend as its
 * local address. `ep` is the local pod that opens it (its egress policy
 * judges it), or NULL for a client outside. */
static __always_inline int l7_connection(struct __sk_buff *skb, const struct weft_config *cfg,
					 const struct pkt4 *p, __u32 src_identity,
					 const struct weft_endpoint *ep,
					 const struct weft_svc_val *svc, __u8 obs)
{
	struct weft_ct_key key;
	struct weft_ct_entry *ct, e;
	int dir = ct_lookup(p, &key, &ct);
	__u8 seen = 0;

	if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p)) {
		seen = ct_account(ct, dir, p);
	} else {
		__u8 flags = WEFT_CT_PROXY;

		if (ep) {
			struct policy_result r;
			struct pkt4 target;
			int rc;

			l7_policy_target(p, svc, &target);
			rc = policy_enforce(cfg, &target, skb->ifindex, ep, ipcache_identity(target.daddr),
					    WEFT_DIR_EGRESS, &r);
			if (rc)
				return rc;
			flags |= WEFT_CT_EGRESS_OK;
		}
		dir = CT_NEW;
		ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
		ct_entry_init(&e, p, flags);
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

/* A local pod opens a connection; p is its first packet after any Service
 * translation, e the conntrack entry to create for it (flags and reverse
 * translation set by the caller), ct the entry conntrack already had, if the
 * connection predates its egress check. The pod's egress policy judges the
 * connection on its real destination; an allowed one goes through the proxy
 * when that policy, or the ingress policy of a local destination, says so. */
static __always_inline int lxc_open(struct __sk_buff *skb, const struct weft_config *cfg,
				    const struct pkt4 *p, const struct weft_endpoint *ep, struct weft_ct_entry *ct,
				    struct weft_ct_entry *e, const struct trace_extra *x)
{
	__u32 dst_identity = ipcache_identity(p->daddr);
	struct policy_result r;
	struct weft_ct_key key;
	__u16 proxy_port;
	__u8 seen = 0;
	int rc;

	rc = policy_enforce(cfg, p, skb->ifindex, ep, dst_identity, WEFT_DIR_EGRESS, &r);
	if (rc)
		return rc;
	if (ct) {
		/* Tracked before this pod's egress was judged (an older agent):
		 * now allowed; redirecting it mid-stream would break it. */
		ct->flags |= WEFT_CT_EGRESS_OK;
		seen = ct_account(ct, CT_ESTABLISHED, p);
		trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_ENDPOINT, CT_ESTABLISHED, seen, x);
		return TC_ACT_OK;
	}
	/* To the node itself: its host policy's ingress too. */
	if (dst_identity == WEFT_ID_HOST) {
		rc = host_policy_enforce(cfg, p, skb->ifindex, ep->identity, WEFT_DIR_INGRESS);
		if (rc)
			return rc;
	}
	proxy_port = r.proxy_port;
	if (!proxy_port && p->proto == IPPROTO_TCP)
		proxy_port = ingress_proxy_port(cfg, p, skb->ifindex, ep->identity);
	e->flags |= WEFT_CT_EGRESS_OK;
	if (proxy_port) {
		e->flags |= WEFT_CT_PROXY;
		e->proxy_port = proxy_port;
	}
	e->src_identity = ep->identity;
	ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
	if (!ct_create(&key, e))
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_ENDPOINT, CT_NEW, 0, x);
	if (proxy_port)
		return redirect_to_proxy(skb, cfg, p, CT_NEW, 0, proxy_port);
	return TC_ACT_OK;
}

/* A packet of a connection the pod opened and that was judged already. */
static __always_inline int lxc_established(struct __sk_buff *skb, const struct weft_config *cfg,
					   const struct pkt4 *p, struct weft_ct_entry *ct,
					   const struct trace_extra *x)
{
	__u8 seen = ct_account(ct, CT_ESTABLISHED, p);

	trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_ENDPOINT, CT_ESTABLISHED, seen, x);
	if (ct->flags & WEFT_CT_PROXY)
		return redirect_to_proxy(skb, cfg, p, CT_ESTABLISHED, seen, ct->proxy_port);
	return TC_ACT_OK;
}

/* A connection keeps the forwarding it began with when its frontend changes
 * between its backends and the proxy (the agent hands a frontend to its
 * proxy port only once it holds the proxy's socket, and takes it back when
 * the L7 config goes); only new connections follow the frontend. Returns 1
 * when this packet goes to the proxy, 0 when to the backends, and moves the
 * connection's entry to `*ct` when the proxy has it. A SYN is new (an entry
 * left by an earlier connection of the same tuple is dropped); a
 * connection the proxy has is tracked by its frontend tuple; one that began
 * plain has a backend chosen for that tuple. */
static __always_inline int to_proxy(const struct pkt4 *p, const struct weft_svc_val *svc,
				    struct weft_ct_entry **ct)
{
	int l7 = (svc->flags & WEFT_SVC_L7) != 0;
	struct weft_ct_key key;

	*ct = 0;
	if (p->proto != IPPROTO_TCP)
		return l7;
	if (ct_lookup(p, &key, ct) != CT_ESTABLISHED || !((*ct)->flags & WEFT_CT_PROXY)) {
		*ct = 0;
		if (!l7 || (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
			return l7;
		ct_key_fwd(&key, p, WEFT_CT_SCOPE_SVC);
		return bpf_map_lookup_elem(&weft_lb, &key) == 0;
	}
	if ((p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN && !l7) {
		bpf_map_delete_elem(&weft_ct, &key);
		*ct = 0;
		return 0;
	}
	return 1;
}

/* Pod -> Service frontend (ClusterIP, or a NodePort/external address reached
 * from inside): DNAT to a backend chosen per connection, then the pod's
 * egress policy on that backend. */
static __always_inline int lxc_to_service(struct __sk_buff *skb, const struct weft_config *cfg,
					  struct pkt4 *p, const struct weft_endpoint *ep,
					  const struct weft_svc_val *svc)
{
	struct weft_ct_key lbkey, key;
	struct weft_ct_entry *ct, e;
	struct weft_lb_entry *lb;
	struct trace_extra x = { .flags = WEFT_EVF_XLATED_DST };
	int dir, is_new = 0, rc;

	if (to_proxy(p, svc, &ct)) {
		/* Began with the proxy, the frontend went plain since. */
		if (ct && !(svc->flags & WEFT_SVC_L7))
			return lxc_established(skb, cfg, p, ct, 0);
		return l7_connection(skb, cfg, p, ep->identity, ep, svc, WEFT_OBS_FROM_ENDPOINT);
	}
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
	if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p) && (ct->flags & WEFT_CT_EGRESS_OK))
		return lxc_established(skb, cfg, p, ct, &x);
	ct_entry_init(&e, p, WEFT_CT_DNAT);
	e.rev_addr = x.orig_addr;
	e.rev_port = x.orig_port;
	return lxc_open(skb, cfg, p, ep, dir == CT_ESTABLISHED && !ct_is_reopen(ct, p) ? ct : 0, &e, &x);
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
		ct_entry_init(&e, p, 0);
		return lxc_open(skb, cfg, p, ep, 0, &e, 0);
	}
	if (dir == CT_ESTABLISHED) {
		if (ct->flags & WEFT_CT_EGRESS_OK)
			return lxc_established(skb, cfg, p, ct, 0);
		ct_entry_init(&e, p, 0);
		return lxc_open(skb, cfg, p, ep, ct, &e, 0);
	}

	/* A reply: the pod answers a connection someone else opened. */
	seen = ct_account(ct, dir, p);
	if ((ct->flags & WEFT_CT_NODEPORT) && (ct->flags & WEFT_CT_DNAT)) {
		/* A local backend answering a north-south client: restore the
		 * frontend as the source and send it out ourselves (the stack
		 * would refuse a forwarded packet from the node's own address). */
		struct trace_extra x = {};

		rc = revnat_to_frontend(skb, p, ct, &x);
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
			rc = revnat_to_frontend(skb, p, ct, &x);
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
	if (src_identity == WEFT_ID_HOST) {
		/* The node opens it: its host policy's egress first (not for
		 * the proxy's upstreams). */
		rc = host_egress_enforce(cfg, skb, p, ep->identity);
		if (rc)
			return rc;
	}
	if (src_identity == WEFT_ID_HOST && cfg && (cfg->flags & WEFT_CFG_ALLOW_HOST_INGRESS)) {
		/* The node itself, and the proxy on behalf of its clients. */
	} else {
		rc = policy_enforce(cfg, p, skb->ifindex, ep, src_identity, WEFT_DIR_INGRESS, &r);
		if (rc)
			return rc;
		/* Rules that want the proxy were applied where the packet entered
		 * the node; one arriving here came some way the datapath cannot
		 * redirect (it never passed a weft hook that could). */
		if (r.proxy_port)
			return DROP_DIR(cfg, p, skb->ifindex, WEFT_DROP_PROXY_LOOKUP_FAILED, WEFT_DIR_INGRESS);
	}

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
