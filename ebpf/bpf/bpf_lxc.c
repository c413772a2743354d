/* SPDX-License-Identifier: Apache-2.0 */
/* Entry programs on a pod's host-side device. The logic lives in lib/lxc.h. */
#include "lib/lxc.h"

/* Parses, and keeps ARP flowing; anything else that is not IPv4 is dropped
 * (this datapath does not enforce policy on IPv6, so it does not pass it). */
static __always_inline int lxc_parse(struct __sk_buff *skb, const struct weft_config *cfg,
				     struct pkt4 *p)
{
	int rc;

	__builtin_memset(p, 0, sizeof(*p));
	rc = parse_ipv4(skb, p);
	if (rc == PARSE_NOT_IPV4)
		return skb->protocol == bpf_htons(ETH_P_ARP) ? TC_ACT_OK
							     : DROP(cfg, p, skb->ifindex, WEFT_DROP_UNKNOWN_L3);
	if (rc < 0)
		return DROP(cfg, p, skb->ifindex, -rc);
	return -1;
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct weft_endpoint *ep;
	struct pkt4 p;
	int rc = lxc_parse(skb, cfg, &p);

	if (rc >= 0)
		return rc;
	ep = bpf_map_lookup_elem(&weft_endpoints, &p.saddr);
	if (!ep)
		return DROP(cfg, &p, skb->ifindex, WEFT_DROP_INVALID_SOURCE_IP);
	return lxc_from_container(skb, cfg, &p, ep);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct weft_endpoint *ep;
	struct pkt4 p;
	int rc = lxc_parse(skb, cfg, &p);

	if (rc >= 0)
		return rc;
	ep = bpf_map_lookup_elem(&weft_endpoints, &p.daddr);
	if (!ep)
		return TC_ACT_OK; /* not addressed to the pod: nothing of ours */
	return lxc_to_container(skb, cfg, &p, ep);
}

char _license[] SEC("license") = "GPL";
