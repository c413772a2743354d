/* SPDX-License-Identifier: Apache-2.0 */
/* Entry programs on the node's external device. The logic lives in lib/netdev.h. */
#include "lib/netdev.h"

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	return handle_from_netdev(skb);
}

SEC("classifier")
int to_netdev(struct __sk_buff *skb)
{
	return handle_to_netdev(skb);
}

char _license[] SEC("license") = "GPL";
