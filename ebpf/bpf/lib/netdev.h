/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The node's external device: north-south Services (NodePort, LoadBalancer and
 * external IPs) on the way in (from-netdev, tc ingress), and on the way out
 * (to-netdev, tc egress) masquerading of pod traffic that leaves the
 * native-routing CIDR. Pod-to-pod traffic between nodes is routed natively.
 */
#ifndef WEFT_NETDEV_H
#define WEFT_NETDEV_H

#include "lxc.h"

static __always_inline int in_native_cidr(const struct weft_config *cfg, __u32 addr)
{
	__u32 mask;

	if (!cfg || !cfg->native_cidr_len)
		return 0;
	if (cfg->native_cidr_len >= 32)
		return addr == cfg->native_cidr;
	mask = bpf_htonl(~((1U << (32 - cfg->native_cidr_len)) - 1));
	return (addr & mask) == (cfg->native_cidr & mask);
}

/* Rewrites the source to the connection's SNAT address, noting it for the trace. */
static __always_inline int snat_to(struct __sk_buff *skb, struct pkt4 *p, const struct weft_lb_entry *lb,
				   struct trace_extra *x)
{
	x->flags |= WEFT_EVF_XLATED_SRC;
	x->nat_addr = lb->nat_addr;
	x->nat_port = lb->nat_port;
	return nat_rewrite(skb, p, 1, lb->nat_addr, lb->nat_port);
}

/* A client outside reaches a NodePort, LoadBalancer or external IP. A local
 * backend gets the packet DNATed through the stack; a remote one gets it DNATed
 * and SNATed to this node, so its reply comes back here to be reversed. */
static __always_inline int netdev_to_service(struct __sk_buff *skb, const struct weft_config *cfg,
					     struct pkt4 *p, const struct weft_svc_val *svc)
{
	struct weft_ct_key lbkey, key;
	struct weft_ct_entry *ct, e;
	struct weft_lb_entry *lb;
	struct trace_extra x = { .flags = WEFT_EVF_XLATED_DST };
	int dir, is_new = 0, rc;
	__u16 proxy_port = 0;
	__u8 seen = 0;

	if (svc->flags & WEFT_SVC_L7)
		return l7_connection(skb, cfg, p, ipcache_identity(p->saddr), 0, svc,
				     WEFT_OBS_FROM_NETWORK);
	if (!svc->count)
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_NO_SERVICE);
	lb = lb_backend(cfg, p, svc, &lbkey, &is_new);
	if (!lb)
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_NO_SERVICE);

	if (is_new) {
		__u32 backend = lb->backend_addr;
		int local = bpf_map_lookup_elem(&weft_endpoints, &backend) != 0;

		lb->flags = WEFT_CT_NODEPORT;
		if (!local) {
			struct pkt4 post = *p;

			post.daddr = lb->backend_addr;
			post.dport = lb->backend_port;
			ct_entry_init(&e, &post, WEFT_CT_DNAT | WEFT_CT_SNAT | WEFT_CT_NODEPORT);
			e.rev_addr = p->daddr;
			e.rev_port = p->dport;
			e.snat_addr = p->saddr;
			e.snat_port = p->sport;
			e.src_identity = ipcache_identity(p->saddr);
			lb->nat_port = cfg ? snat_alloc(cfg, &post, cfg->node_ip, &e) : 0;
			if (!lb->nat_port)
				return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
			lb->nat_addr = cfg->node_ip;
			lb->flags |= WEFT_CT_SNAT;
		}
	}

	__u32 client_addr = p->saddr;
	__u16 client_port = p->sport;

	x.orig_addr = p->daddr;
	x.orig_port = p->dport;
	rc = nat_rewrite(skb, p, 0, lb->backend_addr, lb->backend_port);
	if (rc < 0)
		return DROP(cfg, p, skb->ifindex, -rc);
	if (lb->nat_addr) {
		rc = snat_to(skb, p, lb, &x);
		if (rc < 0)
			return DROP(cfg, p, skb->ifindex, -rc);
	}

	dir = ct_lookup(p, &key, &ct);
	if (is_new && lb->nat_addr) {
		/* snat_alloc inserted this connection's entry for this packet. */
		dir = CT_NEW;
	} else if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p)) {
		seen = ct_account(ct, dir, p);
		if (ct->flags & WEFT_CT_PROXY)
			proxy_port = ct->proxy_port;
	} else {
		dir = CT_NEW;
		ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
		ct_entry_init(&e, p, WEFT_CT_DNAT | WEFT_CT_NODEPORT | (lb->flags & WEFT_CT_SNAT));
		e.rev_addr = x.orig_addr;
		e.rev_port = x.orig_port;
		e.snat_addr = client_addr;
		e.snat_port = client_port;
		e.src_identity = ipcache_identity(client_addr);
		if (!lb->nat_addr)
			proxy_port = ingress_proxy_port(cfg, p, skb->ifindex, e.src_identity);
		if (proxy_port) {
			e.flags |= WEFT_CT_PROXY;
			e.proxy_port = proxy_port;
		}
		if (!ct_create(&key, &e))
			return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
	}
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_NETWORK, dir, seen, &x);
	if (proxy_port)
		return redirect_to_proxy(skb, cfg, p, dir, seen, proxy_port);
	if (lb->nat_addr) {
		mark_set(skb, WEFT_MARK_SEEN);
		rc = fib_redirect(skb, p);
		if (rc < 0)
			return DROP(cfg, p, skb->ifindex, -rc);
		return rc;
	}
	return TC_ACT_OK;
}

/* from-netdev: everything arriving from the network. */
static __always_inline int netdev_from_network(struct __sk_buff *skb, const struct weft_config *cfg,
					       struct pkt4 *p)
{
	struct weft_svc_val *svc;
	struct weft_ct_key key;
	struct weft_ct_entry *ct, e;
	int dir, rc;
	__u8 seen = 0;

	svc = svc_lookup(p->daddr, p->dport, p->proto);
	if (svc && (svc->flags & (WEFT_SVC_NODEPORT | WEFT_SVC_EXTERNAL)))
		return netdev_to_service(skb, cfg, p, svc);

	dir = ct_lookup(p, &key, &ct);
	if (dir == CT_REPLY) {
		struct trace_extra x = {};
		__u8 flags = ct->flags;

		seen = ct_account(ct, dir, p);
		if (flags & WEFT_CT_SNAT) {
			/* Our translated connection (NodePort via a remote backend,
			 * or masqueraded pod traffic): give the reply back its
			 * original destination, and its frontend as the source. */
			x.flags |= WEFT_EVF_XLATED_DST;
			x.orig_addr = p->daddr;
			x.orig_port = p->dport;
			rc = nat_rewrite(skb, p, 0, ct->snat_addr, ct->snat_port);
			if (rc < 0)
				return DROP(cfg, p, skb->ifindex, -rc);
			if (flags & WEFT_CT_DNAT) {
				rc = nat_rewrite(skb, p, 1, ct->rev_addr, ct->rev_port);
				if (rc < 0)
					return DROP(cfg, p, skb->ifindex, -rc);
			}
		}
		trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_NETWORK, dir, seen, &x);
		if (flags & WEFT_CT_NODEPORT) {
			mark_set(skb, WEFT_MARK_SEEN);
			rc = fib_redirect(skb, p);
			if (rc < 0)
				return DROP(cfg, p, skb->ifindex, -rc);
			return rc;
		}
		return TC_ACT_OK;
	}
	if (dir == CT_ESTABLISHED && !ct_is_reopen(ct, p)) {
		seen = ct_account(ct, dir, p);
		trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_NETWORK, dir, seen, 0);
		if (ct->flags & WEFT_CT_PROXY)
			return redirect_to_proxy(skb, cfg, p, dir, seen, ct->proxy_port);
		return TC_ACT_OK;
	}

	/* New inbound connection (a remote pod, or a client of the node itself):
	 * tracked so replies are recognised; pods admit it by their own policy,
	 * except where it sends the peer through the proxy, decided here. */
	ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
	ct_entry_init(&e, p, 0);
	e.src_identity = ipcache_identity(p->saddr);
	if (cfg && cfg->host_policy && ipcache_identity(p->daddr) == WEFT_ID_HOST) {
		/* To the node itself: its host policy's ingress. */
		rc = host_policy_enforce(cfg, p, skb->ifindex, e.src_identity, WEFT_DIR_INGRESS);
		if (rc)
			return rc;
	}
	e.proxy_port = ingress_proxy_port(cfg, p, skb->ifindex, e.src_identity);
	if (e.proxy_port)
		e.flags |= WEFT_CT_PROXY;
	if (!ct_create(&key, &e))
		return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_FROM_NETWORK, CT_NEW, 0, 0);
	if (e.proxy_port)
		return redirect_to_proxy(skb, cfg, p, CT_NEW, 0, e.proxy_port);
	return TC_ACT_OK;
}

/* Does traffic from a local pod to addr leave the cluster network? */
static __always_inline int needs_masquerade(const struct weft_config *cfg, const struct pkt4 *p)
{
	struct weft_ipcache_key key = { .prefixlen = 32, .addr = p->daddr };
	struct weft_ipcache_val *dst;

	if (!cfg || !(cfg->flags & WEFT_CFG_MASQUERADE) || !has_ports(p))
		return 0;
	if (in_native_cidr(cfg, p->daddr))
		return 0;
	dst = bpf_map_lookup_elem(&weft_ipcache, &key);
	return !dst || dst->identity == WEFT_ID_WORLD ||
	       (dst->identity >= WEFT_IDENTITY_MIN_CIDR && dst->identity < WEFT_IDENTITY_MIN_POD);
}

/* to-netdev: everything leaving through the node's device. */
static __always_inline int netdev_to_network(struct __sk_buff *skb, const struct weft_config *cfg,
					     struct pkt4 *p)
{
	struct weft_ct_key key;
	struct weft_ct_entry *ct, e;
	struct trace_extra x = {};
	int handled = (skb->mark & WEFT_MARK_MASK) == WEFT_MARK_SEEN;
	int dir, rc;
	__u8 seen = 0;

	if (handled && bpf_map_lookup_elem(&weft_endpoints, &p->saddr) && needs_masquerade(cfg, p)) {
		struct weft_ct_key lbkey;
		struct weft_lb_entry *lb, fresh;

		ct_key_fwd(&lbkey, p, WEFT_CT_SCOPE_SVC);
		lb = bpf_map_lookup_elem(&weft_lb, &lbkey);
		if (!lb) {
			ct_entry_init(&e, p, WEFT_CT_SNAT);
			e.snat_addr = p->saddr;
			e.snat_port = p->sport;
			e.src_identity = ipcache_identity(p->saddr);
			__builtin_memset(&fresh, 0, sizeof(fresh));
			fresh.last_seen_ns = now_ns();
			fresh.backend_addr = p->daddr;
			fresh.backend_port = p->dport;
			fresh.nat_addr = cfg->node_ip;
			fresh.nat_port = snat_alloc(cfg, p, cfg->node_ip, &e);
			fresh.flags = WEFT_CT_SNAT;
			if (!fresh.nat_port)
				return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
			if (bpf_map_update_elem(&weft_lb, &lbkey, &fresh, BPF_ANY) < 0)
				return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
			lb = bpf_map_lookup_elem(&weft_lb, &lbkey);
			if (!lb)
				return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
		}
		rc = snat_to(skb, p, lb, &x);
		if (rc < 0)
			return DROP(cfg, p, skb->ifindex, -rc);
	}

	dir = ct_lookup(p, &key, &ct);
	if (dir == CT_NEW || (dir == CT_ESTABLISHED && ct_is_reopen(ct, p))) {
		dir = CT_NEW;
		if (!handled) {
			/* The node's own connection (a node process, or the proxy
			 * talking to a backend): judged by its host policy's
			 * egress (not the proxy's upstreams), tracked so its
			 * replies are known. */
			if (cfg && cfg->host_policy && ipcache_identity(p->saddr) == WEFT_ID_HOST) {
				rc = host_egress_enforce(cfg, skb, p, ipcache_identity(p->daddr));
				if (rc)
					return rc;
			}
			ct_key_fwd(&key, p, WEFT_CT_SCOPE_CONN);
			ct_entry_init(&e, p, WEFT_CT_FROM_HOST);
			e.src_identity = WEFT_ID_HOST;
			if (!ct_create(&key, &e))
				return DROP(cfg, p, skb->ifindex, WEFT_DROP_CT_CREATE_FAILED);
		}
	} else {
		seen = ct_account(ct, dir, p);
		if (dir == CT_REPLY && (ct->flags & (WEFT_CT_PROXY | WEFT_CT_NODEPORT | WEFT_CT_DNAT | WEFT_CT_SNAT)) ==
					       (WEFT_CT_PROXY | WEFT_CT_NODEPORT | WEFT_CT_DNAT)) {
			/* The proxy answers a north-south client for a local
			 * backend it stood in for: the reply leaves from the
			 * frontend, as the backend's own would have. */
			rc = revnat_to_frontend(skb, p, ct, &x);
			if (rc < 0)
				return DROP(cfg, p, skb->ifindex, -rc);
		}
	}
	trace_if(cfg, p, skb->ifindex, WEFT_OBS_TO_NETWORK, dir, seen, &x);
	return TC_ACT_OK;
}

/* Non-IPv4 traffic on the node's device is not ours to judge: it passes. */
#define NETDEV_NON_IPV4 TC_ACT_OK

/* tc ingress of the node's device. */
static __always_inline int handle_from_netdev(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct pkt4 p;
	int rc = hook_parse(skb, cfg, &p, NETDEV_NON_IPV4);

	return rc >= 0 ? rc : netdev_from_network(skb, cfg, &p);
}

/* tc egress of the node's device. */
static __always_inline int handle_to_netdev(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct pkt4 p;
	int rc = hook_parse(skb, cfg, &p, NETDEV_NON_IPV4);

	return rc >= 0 ? rc : netdev_to_network(skb, cfg, &p);
}

#endif /* WEFT_NETDEV_H */
