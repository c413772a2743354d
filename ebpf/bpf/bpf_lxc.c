/* SPDX-License-Identifier: Apache-2.0 */
/* Entry programs on a pod's host-side device. The logic lives in lib/lxc.h. */
#include "lib/lxc.h"

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	return handle_from_container(skb);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	return handle_to_container(skb);
}

char _license[] SEC("license") = "GPL";
