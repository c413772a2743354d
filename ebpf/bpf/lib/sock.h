/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The node's own processes (cgroup socket hooks) and the proxy hand-off
 * (sk_lookup). Node processes reaching a plain Service connect straight to a
 * backend chosen at connect()/sendmsg() time, and see the frontend again in
 * getpeername()/recvmsg(); for an L7 Service their socket is marked so its
 * packets reach the proxy like a pod's would.
 */
#ifndef WEFT_SOCK_H
#define WEFT_SOCK_H

#include "lb.h"
#include "trace.h"

/* Whose socket this is: the node's own (its network namespace), a pod's
 * (another namespace under the attached cgroup: translated only when
 * WEFT_CFG_SOCK_LB_PODS is set, else its packets are translated on its
 * device), or none of ours. */
enum sock_owner {
	SOCK_NONE = 0,
	SOCK_NODE,
	SOCK_POD,
};

static __always_inline int sock_owner(struct bpf_sock_addr *ctx, const struct weft_config *cfg)
{
	if (!cfg || !cfg->netns_cookie)
		return SOCK_NONE;
	if (bpf_get_netns_cookie(ctx) == cfg->netns_cookie)
		return SOCK_NODE;
	return (cfg->flags & WEFT_CFG_SOCK_LB_PODS) ? SOCK_POD : SOCK_NONE;
}

static __always_inline void sock_pkt(struct pkt4 *p, struct bpf_sock_addr *ctx)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->daddr = ctx->user_ip4;
	p->dport = (__u16)ctx->user_port;
	p->proto = (__u8)ctx->protocol;
}

/* connect() and sendmsg(): returns 1 to let the call proceed, 0 to refuse it.
 * is_connect must be a constant: only connect hooks may redirect to the proxy
 * (which needs bpf_bind). */
static __always_inline int sock4_forward(struct bpf_sock_addr *ctx, const int is_connect)
{
	const struct weft_config *cfg = config_get();
	int owner = sock_owner(ctx, cfg);
	struct weft_svc_val *svc;
	struct weft_backend *be;
	struct weft_sock_rev rev;
	struct pkt4 p;
	__u32 id = 0;
	__u64 cookie;

	if (owner == SOCK_NONE || !cfg)
		return 1;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	sock_pkt(&p, ctx);
	svc = svc_lookup(p.daddr, p.dport, p.proto);
	if (!svc)
		return 1;

	if (svc->flags & WEFT_SVC_L7) {
		struct trace_extra x = { .proxy_port = svc->proxy_port };
		__u32 mark = WEFT_MARK_TO_PROXY;

		/* A pod's L7 connection is redirected per packet on its device. */
		if (!is_connect || p.proto != IPPROTO_TCP || owner != SOCK_NODE)
			return 1;
		if (bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0) {
			emit_drop(cfg, &p, 0, WEFT_DROP_PROXY_SET_FAILED, __LINE__);
			return 0;
		}
		/* The marked route is `local`, which would pick the Service
		 * address itself as the source, and the kernel refuses a source
		 * no device owns. Bind to the node's address first (a socket the
		 * process bound already keeps its address: that call fails). */
		if (cfg->node_ip) {
			struct sockaddr_in src = {
				.sin_family = AF_INET,
				.sin_addr.s_addr = cfg->node_ip,
			};

			bpf_bind(ctx, (struct sockaddr *)&src, sizeof(src));
		}
		if (cfg->emit_level != WEFT_EMIT_OFF) {
			struct weft_event *ev = event_init(WEFT_EV_SOCK, WEFT_OBS_TO_PROXY, &p, 0);

			if (ev) {
				ev->reason = WEFT_REASON_NEW;
				ev->proxy_port = x.proxy_port;
				ev->src_identity = WEFT_ID_HOST;
				event_submit(cfg, ev);
			}
		}
		return 1;
	}

	be = svc_pick_backend(p.daddr, p.dport, p.proto, svc, &id);
	if (!be) {
		emit_drop(cfg, &p, 0, WEFT_DROP_NO_SERVICE, __LINE__);
		return 0;
	}
	cookie = bpf_get_socket_cookie(ctx);
	rev.frontend_addr = p.daddr;
	rev.frontend_port = p.dport;
	rev._pad = 0;
	rev.backend_addr = be->addr;
	rev.backend_port = be->port;
	rev._pad2 = 0;
	bpf_map_update_elem(&weft_sock_rev, &cookie, &rev, BPF_ANY);
	ctx->user_ip4 = be->addr;
	ctx->user_port = be->port;

	if (cfg->emit_level != WEFT_EMIT_OFF) {
		struct weft_event *ev = event_init(WEFT_EV_SOCK,
						   owner == SOCK_NODE ? WEFT_OBS_FROM_HOST : WEFT_OBS_FROM_ENDPOINT,
						   &p, 0);

		if (ev) {
			ev->reason = WEFT_REASON_NEW;
			ev->flags = WEFT_EVF_XLATED_DST;
			ev->orig_addr = p.daddr;
			ev->orig_port = p.dport;
			ev->daddr = be->addr;
			ev->dport = be->port;
			if (owner == SOCK_NODE)
				ev->src_identity = WEFT_ID_HOST;
			event_submit(cfg, ev);
		}
	}
	return 1;
}

/* getpeername() and recvmsg(): the backend's address reads as the frontend's. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	const struct weft_config *cfg = config_get();
	struct weft_sock_rev *rev;
	__u64 cookie;

	if (sock_owner(ctx, cfg) == SOCK_NONE)
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	rev = bpf_map_lookup_elem(&weft_sock_rev, &cookie);
	if (rev && rev->backend_addr == ctx->user_ip4 && rev->backend_port == (__u16)ctx->user_port) {
		ctx->user_ip4 = rev->frontend_addr;
		ctx->user_port = rev->frontend_port;
	}
	return 1;
}

/* A drop record for a connection sk_lookup could not hand to the proxy. */
static __always_inline void sk_lookup_drop(struct bpf_sk_lookup *ctx, __u8 reason, __u32 line)
{
	struct pkt4 p;

	__builtin_memset(&p, 0, sizeof(p));
	p.saddr = ctx->remote_ip4;
	p.sport = ctx->remote_port;
	p.daddr = ctx->local_ip4;
	p.dport = bpf_htons((__u16)ctx->local_port);
	p.proto = IPPROTO_TCP;
	emit_drop(config_get(), &p, ctx->ingress_ifindex, reason, line);
}

/* sk_lookup: a connection for an L7 frontend (delivered locally because its
 * packets carry the proxy mark, or addressed to a node address for NodePort)
 * is given to the proxy's listener. Running at socket lookup, after the
 * established table and for TIME_WAIT reuse too, keeps a client that reuses a
 * source port from losing its SYN. */
static __always_inline int proxy_assign(struct bpf_sk_lookup *ctx)
{
	struct weft_svc_val *svc;
	struct bpf_sock *sk;
	__u32 port_key = 0;
	long err;

	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	svc = svc_lookup(ctx->local_ip4, bpf_htons((__u16)ctx->local_port), IPPROTO_TCP);
	if (svc && (svc->flags & WEFT_SVC_L7)) {
		port_key = svc->proxy_port;
	} else {
		/* A connection policy sent through the proxy: its conntrack
		 * entry, keyed by the tuple as delivered, names the port. */
		struct weft_ct_key key = {
			.saddr = ctx->remote_ip4,
			.daddr = ctx->local_ip4,
			.sport = (__u16)ctx->remote_port,
			.dport = bpf_htons((__u16)ctx->local_port),
			.proto = IPPROTO_TCP,
			.scope = WEFT_CT_SCOPE_CONN,
		};
		struct weft_ct_entry *ct = bpf_map_lookup_elem(&weft_ct, &key);

		if (!ct || !(ct->flags & WEFT_CT_PROXY))
			return SK_PASS;
		port_key = ct->proxy_port;
	}
	sk = bpf_map_lookup_elem(&weft_proxy_socks, &port_key);
	if (!sk) {
		/* No listener: say so, and let the stack refuse the client. */
		sk_lookup_drop(ctx, WEFT_DROP_PROXY_LOOKUP_FAILED, __LINE__);
		return SK_PASS;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		sk_lookup_drop(ctx, WEFT_DROP_PROXY_SET_FAILED, __LINE__);
	return SK_PASS;
}

#endif /* WEFT_SOCK_H */
