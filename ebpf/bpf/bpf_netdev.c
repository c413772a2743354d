/* SPDX-License-Identifier: Apache-2.0 */
/* Entry programs on the node's external device. The logic lives in lib/netdev.h. */
#include "lib/netdev.h"

/* Non-IPv4 traffic on the node's device is not ours to judge: it passes. */
static __always_inline int netdev_parse(struct __sk_buff *skb, const struct weft_config *cfg,
					struct pkt4 *p)
{
	int rc;

	__builtin_memset(p, 0, sizeof(*p));
	rc = parse_ipv4(skb, p);
	if (rc == PARSE_NOT_IPV4)
		return TC_ACT_OK;
	if (rc < 0)
		return DROP(cfg, p, skb->ifindex, -rc);
	return -1;
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct pkt4 p;
	int rc = netdev_parse(skb, cfg, &p);

	if (rc >= 0)
		return rc;
	return netdev_from_network(skb, cfg, &p);
}

SEC("classifier")
int to_netdev(struct __sk_buff *skb)
{
	const struct weft_config *cfg = config_get();
	struct pkt4 p;
	int rc = netdev_parse(skb, cfg, &p);

	if (rc >= 0)
		return rc;
	return netdev_to_network(skb, cfg, &p);
}

char _license[] SEC("license") = "GPL";
