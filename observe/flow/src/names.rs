//! Names for the datapath's and Hubble's numbers: observation points, drop
//! reasons, trace reasons, policy match types, reserved identities, as
//! Hubble spells them. The numbers are Hubble's; the datapath's ABI
//! (`ebpf/bpf/include/weft/abi.h`) uses the same ones, which a test of the
//! pipeline checks (`weft-observe`, `pipeline::ringbuf`), so that the CLI
//! can name them without linking the datapath.

use crate::proto::flow::TrafficDirection;

/// Hubble's name of an observation point (TraceObservationPoint numbering).
pub fn observation_point(obs: u32) -> &'static str {
    match obs {
        0 | 101 => "to-endpoint",
        1 => "to-proxy",
        2 => "to-host",
        3 => "to-stack",
        4 => "to-overlay",
        5 => "from-endpoint",
        6 => "from-proxy",
        7 => "from-host",
        8 => "from-stack",
        9 => "from-overlay",
        10 => "from-network",
        11 => "to-network",
        12 => "from-crypto",
        13 => "to-crypto",
        _ => "unknown",
    }
}

/// The observation point of a trace label (`to-endpoint`...), in the
/// datapath's trace sub_type numbering (to-endpoint is 0).
pub fn trace_subtype(label: &str) -> Option<i32> {
    (0..=13).find(|n| observation_point(*n) == label).map(|n| n as i32)
}

/// Hubble's DropReason enum name and the text `hubble observe` prints for it.
pub const DROP_REASONS: &[(u32, &str, &str)] = &[
    (130, "INVALID_SOURCE_MAC", "Invalid source mac"),
    (131, "INVALID_DESTINATION_MAC", "Invalid destination mac"),
    (132, "INVALID_SOURCE_IP", "Invalid source ip"),
    (133, "POLICY_DENIED", "Policy denied"),
    (134, "INVALID_PACKET_DROPPED", "Invalid packet"),
    (135, "CT_TRUNCATED_OR_INVALID_HEADER", "CT: Truncated or invalid header"),
    (136, "CT_MISSING_TCP_ACK_FLAG", "Fragmentation needed"),
    (137, "CT_UNKNOWN_L4_PROTOCOL", "CT: Unknown L4 protocol"),
    (138, "CT_CANNOT_CREATE_ENTRY_FROM_PACKET", "CT: Can't create entry from packet"),
    (139, "UNSUPPORTED_L3_PROTOCOL", "Unsupported L3 protocol"),
    (140, "MISSED_TAIL_CALL", "Missed tail call"),
    (141, "ERROR_WRITING_TO_PACKET", "Error writing to packet"),
    (142, "UNKNOWN_L4_PROTOCOL", "Unknown L4 protocol"),
    (143, "UNKNOWN_ICMPV4_CODE", "Unknown ICMPv4 code"),
    (144, "UNKNOWN_ICMPV4_TYPE", "Unknown ICMPv4 type"),
    (145, "UNKNOWN_ICMPV6_CODE", "Unknown ICMPv6 code"),
    (146, "UNKNOWN_ICMPV6_TYPE", "Unknown ICMPv6 type"),
    (147, "ERROR_RETRIEVING_TUNNEL_KEY", "Error retrieving tunnel key"),
    (148, "ERROR_RETRIEVING_TUNNEL_OPTIONS", "Error retrieving tunnel options"),
    (149, "INVALID_GENEVE_OPTION", "Invalid Geneve option"),
    (150, "UNKNOWN_L3_TARGET_ADDRESS", "Unknown L3 target address"),
    (151, "STALE_OR_UNROUTABLE_IP", "Stale or unroutable IP"),
    (152, "NO_MATCHING_LOCAL_CONTAINER_FOUND", "No matching local container found"),
    (153, "ERROR_WHILE_CORRECTING_L3_CHECKSUM", "Error while correcting L3 checksum"),
    (154, "ERROR_WHILE_CORRECTING_L4_CHECKSUM", "Error while correcting L4 checksum"),
    (155, "CT_MAP_INSERTION_FAILED", "CT: Map insertion failed"),
    (156, "INVALID_IPV6_EXTENSION_HEADER", "Invalid IPv6 extension header"),
    (157, "IP_FRAGMENTATION_NOT_SUPPORTED", "IP fragmentation not supported"),
    (158, "SERVICE_BACKEND_NOT_FOUND", "Service backend not found"),
    (160, "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT", "No tunnel/encapsulation endpoint (datapath BUG!)"),
    (161, "FAILED_TO_INSERT_INTO_PROXYMAP", "NAT 46/64 not enabled"),
    (162, "REACHED_EDT_RATE_LIMITING_DROP_HORIZON", "Reached EDT rate-limiting drop horizon"),
    (163, "UNKNOWN_CONNECTION_TRACKING_STATE", "Unknown connection tracking state"),
    (164, "LOCAL_HOST_IS_UNREACHABLE", "Local host is unreachable"),
    (
        165,
        "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
        "No configuration available to perform policy decision",
    ),
    (166, "UNSUPPORTED_L2_PROTOCOL", "Unsupported L2 protocol"),
    (167, "NO_MAPPING_FOR_NAT_MASQUERADE", "No mapping for NAT masquerade"),
    (168, "UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE", "Unsupported protocol for NAT masquerade"),
    (169, "FIB_LOOKUP_FAILED", "FIB lookup failed"),
    (170, "ENCAPSULATION_TRAFFIC_IS_PROHIBITED", "Encapsulation traffic is prohibited"),
    (171, "INVALID_IDENTITY", "Invalid identity"),
    (172, "UNKNOWN_SENDER", "Unknown sender"),
    (173, "NAT_NOT_NEEDED", "NAT not needed"),
    (174, "IS_A_CLUSTERIP", "Is a ClusterIP"),
    (175, "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", "First logical datagram fragment not found"),
    (176, "FORBIDDEN_ICMPV6_MESSAGE", "Forbidden ICMPv6 message"),
    (177, "DENIED_BY_LB_SRC_RANGE_CHECK", "Denied by LB src range check"),
    (178, "SOCKET_LOOKUP_FAILED", "Socket lookup failed"),
    (179, "SOCKET_ASSIGN_FAILED", "Socket assign failed"),
    (180, "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL", "Proxy redirection not supported for protocol"),
    (181, "POLICY_DENY", "Policy denied by denylist"),
    (182, "VLAN_FILTERED", "VLAN traffic disallowed by VLAN filter"),
    (183, "INVALID_VNI", "Incorrect VNI from VTEP"),
    (184, "INVALID_TC_BUFFER", "Failed to update or lookup TC buffer"),
    (185, "NO_SID", "No SID was found for the IP address"),
    (186, "MISSING_SRV6_STATE", "SRv6 state was removed during tail call"),
    (187, "NAT46", "L3 translation from IPv4 to IPv6 failed (NAT46)"),
    (188, "NAT64", "L3 translation from IPv6 to IPv4 failed (NAT64)"),
    (189, "AUTH_REQUIRED", "Authentication required"),
    (190, "CT_NO_MAP_FOUND", "No conntrack map found"),
    (191, "SNAT_NO_MAP_FOUND", "No nat map found"),
    (192, "INVALID_CLUSTER_ID", "Invalid ClusterID"),
    (193, "UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP", "Unsupported packet protocol for DSR encapsulation"),
    (194, "NO_EGRESS_GATEWAY", "No egress gateway found"),
    (195, "UNENCRYPTED_TRAFFIC", "Traffic is unencrypted"),
    (196, "TTL_EXCEEDED", "TTL exceeded"),
    (197, "NO_NODE_ID", "No node ID found"),
    (198, "DROP_RATE_LIMITED", "Rate limited"),
    (199, "IGMP_HANDLED", "IGMP handled"),
    (200, "IGMP_SUBSCRIBED", "IGMP subscribed"),
    (201, "MULTICAST_HANDLED", "Multicast handled"),
    (202, "DROP_HOST_NOT_READY", "Host datapath not ready"),
    (203, "DROP_EP_NOT_READY", "Endpoint policy program not available"),
    (204, "DROP_NO_EGRESS_IP", "No Egress IP configured"),
    (205, "DROP_PUNT_PROXY", "Punt to proxy"),
];
/// Hubble's DropReason enum name of a drop code.
pub fn drop_reason(code: u32) -> &'static str {
    DROP_REASONS.iter().find(|(c, _, _)| *c == code).map(|(_, n, _)| *n).unwrap_or("DROP_REASON_UNKNOWN")
}

/// The text `hubble observe` shows for a drop code.
pub fn drop_reason_text(code: u32) -> String {
    DROP_REASONS.iter().find(|(c, _, _)| *c == code).map(|(_, _, t)| t.to_string()).unwrap_or_else(|| code.to_string())
}

/// A drop code from its enum name (case-insensitive).
pub fn drop_reason_code(name: &str) -> Option<u32> {
    DROP_REASONS.iter().find(|(_, n, _)| n.eq_ignore_ascii_case(name)).map(|(c, _, _)| *c)
}

/// Hubble's name of a trace reason.
pub fn trace_reason(r: u32) -> &'static str {
    match r {
        1 => "new",
        2 => "established",
        3 => "reply",
        4 => "related",
        _ => "unknown",
    }
}

/// How a policy verdict matched, as Hubble prints it.
pub fn policy_match(m: u32) -> &'static str {
    match m {
        0 => "none",
        1 => "L3-Only",
        2 => "L3-L4",
        3 => "L4-Only",
        4 => "all",
        5 => "L3-Proto",
        6 => "Proto-Only",
        _ => "unknown",
    }
}

/// Names of the reserved identities as the Hubble CLI prints them.
pub fn reserved_identity(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "unknown",
        1 => "host",
        2 => "world",
        3 => "unmanaged",
        4 => "health",
        5 => "init",
        6 => "remote-node",
        7 => "kube-apiserver",
        8 => "ingress",
        9 => "world-ipv4",
        10 => "world-ipv6",
        _ => return None,
    })
}

/// Event type codes by the names `hubble observe -t` accepts.
pub fn event_type_code(name: &str) -> Option<i32> {
    Some(match name {
        "drop" => 1,
        "debug" => 2,
        "capture" => 3,
        "trace" => 4,
        "policy-verdict" => 5,
        "trace-sock" => 7,
        "l7" => 129,
        "agent" => 130,
        _ => return name.parse().ok(),
    })
}

/// TCP flags as Hubble prints them (`SYN, ACK`).
pub fn tcp_flags(f: u8) -> String {
    TcpFlagNames(f).to_string()
}

/// [`tcp_flags`] written where it is needed (the flow API writes it into
/// every TCP flow's summary, so it does not allocate).
pub struct TcpFlagNames(pub u8);

impl std::fmt::Display for TcpFlagNames {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(u8, &str); 8] = [
            (0x02, "SYN"),
            (0x10, "ACK"),
            (0x01, "FIN"),
            (0x04, "RST"),
            (0x08, "PSH"),
            (0x20, "URG"),
            (0x40, "ECE"),
            (0x80, "CWR"),
        ];
        let mut sep = "";
        for (_, name) in NAMES.iter().filter(|(b, _)| self.0 & b != 0) {
            out.write_str(sep)?;
            out.write_str(name)?;
            sep = ", ";
        }
        Ok(())
    }
}

/// Protocol name of an IP protocol number.
pub fn protocol(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        1 => "ICMPv4",
        132 => "SCTP",
        _ => "unknown",
    }
}

/// `TrafficDirection` by name, case-insensitive.
pub fn direction_by_name(s: &str) -> Option<TrafficDirection> {
    TrafficDirection::from_str_name(&s.to_ascii_uppercase())
}

/// The domain of the names in the flow API's certificates.
pub const FLOW_TLS_DOMAIN: &str = "weft.io";

/// One DNS label of a certificate name: dots (which a node name may hold)
/// become dashes, as Hubble does.
fn label(s: &str) -> String {
    s.replace('.', "-")
}

/// The name in node `node`'s flow API server certificate, and the TLS
/// server name its clients (Hubble Relay through the Peer service, `weft
/// observe --tls-server-name`) verify: Hubble's convention
/// `<node>.<cluster>.hubble-grpc.<domain>` with weft's domain.
pub fn flow_server_name(node: &str, cluster: &str) -> String {
    format!("{}.{}.hubble-grpc.{FLOW_TLS_DOMAIN}", label(node), label(cluster))
}

/// The name newer Hubble Relays (the image deploy/hubble-relay.yaml runs)
/// check when they reach the Peer service over TCP:
/// `hubble-peer.<cluster>.hubble-grpc.cilium.io`, built into the relay with
/// Cilium's domain and not configurable. Every agent serves the Peer service
/// on its flow port, so every node's server certificate carries this name too.
pub fn peer_service_server_name(cluster: &str) -> String {
    format!("hubble-peer.{}.hubble-grpc.cilium.io", label(cluster))
}

/// The name in the flow API's client certificate (for `weft observe` and
/// Hubble Relay).
pub fn flow_client_name(cluster: &str) -> String {
    format!("client.{}.hubble-relay.{FLOW_TLS_DOMAIN}", label(cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(drop_reason(133), "POLICY_DENIED");
        assert_eq!(drop_reason_text(181), "Policy denied by denylist");
        assert_eq!(drop_reason_code("policy_denied"), Some(133));
        assert_eq!(trace_subtype("to-endpoint"), Some(0));
        assert_eq!(trace_subtype("to-proxy"), Some(1));
        assert_eq!(event_type_code("policy-verdict"), Some(5));
        assert_eq!(tcp_flags(0x12), "SYN, ACK");
        assert_eq!(tcp_flags(0), "");
        assert_eq!(tcp_flags(0xff), "SYN, ACK, FIN, RST, PSH, URG, ECE, CWR");
    }

    #[test]
    fn flow_tls_names_follow_hubbles_convention() {
        assert_eq!(flow_server_name("node-1.example.com", "prod.eu"), "node-1-example-com.prod-eu.hubble-grpc.weft.io");
        assert_eq!(flow_client_name("default"), "client.default.hubble-relay.weft.io");
        assert_eq!(peer_service_server_name("prod.eu"), "hubble-peer.prod-eu.hubble-grpc.cilium.io");
    }
}
