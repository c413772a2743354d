/* SPDX-License-Identifier: Apache-2.0 */
/* Forwarding a packet out of the node ourselves, for translated north-south
 * traffic whose addresses the stack would reject (the node's own address as
 * the source of a forwarded packet). */
#ifndef WEFT_FIB_H
#define WEFT_FIB_H

#include "nat.h"

/* Returns a TC action, or a negative drop reason. */
static __always_inline int fib_redirect(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct bpf_fib_lookup fib;
	int rc;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET;
	fib.tos = 0;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	fib.tot_len = p->len - p->l3_off;
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.ifindex = skb->ifindex;

	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		rc = ttl_dec(skb, p);
		if (rc < 0)
			return rc;
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
			return -WEFT_DROP_WRITE_ERROR;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {
			.nh_family = AF_INET,
			.ipv4_nh = fib.ipv4_dst,
		};

		rc = ttl_dec(skb, p);
		if (rc < 0)
			return rc;
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	return -WEFT_DROP_NO_FIB;
}

#endif /* WEFT_FIB_H */
