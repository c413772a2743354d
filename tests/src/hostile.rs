//! Hostile objects: files a careless or malicious user could put in front of
//! the agent (deep nesting, huge names and documents, YAML alias bombs,
//! invalid UTF-8, duplicate keys, out-of-range numbers, references into other
//! namespaces and to Envoy's admin interface), each with the problem the
//! agent must report for it. Used against `weft-agent validate` and against
//! running lab agents (`tests/tests/hostile.rs`).

use std::fmt::Write;

/// One hostile file and what must be said about it.
pub struct Hostile {
    /// File name in the objects directory.
    pub file: &'static str,
    pub contents: Vec<u8>,
    /// Text each problem line about it contains: the object (or file) and the rule.
    pub expect: Vec<&'static str>,
}

fn config(name: &str, namespace: &str, body: &str) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}"
    )
}

/// A listener routing everything to `cluster`, and that cluster (EDS).
fn routes_to(cluster: &str, cluster_resource: &str) -> String {
    format!(
        r#"  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l
          route_config:
            name: r
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: {cluster}}}}}]}}]
          http_filters: [{{name: envoy.filters.http.router}}]
{cluster_resource}"#
    )
}

/// Every hostile file.
pub fn files() -> Vec<Hostile> {
    let mut out = Vec::new();

    // The crash of issue 10: listener metadata nested 45 levels deep.
    let mut deep = String::from("\"leaf\"");
    for _ in 0..45 {
        deep = format!("{{\"k\": {deep}}}");
    }
    out.push(Hostile {
        file: "deep-metadata.yaml",
        contents: config(
            "deep-metadata",
            "default",
            &format!(
                "  resources:\n  - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n    name: l\n    metadata: {{filter_metadata: {{x: {deep}}}}}\n    filter_chains: [{{filters: [{{name: envoy.filters.network.tcp_proxy, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: default/web}}}}]}}]\n"
            ),
        )
        .into_bytes(),
        expect: vec!["EnvoyConfig default/deep-metadata", "nested more than 100 messages deep"],
    });

    // A document nested past the document limit (before any decoding).
    let mut nested = String::from("1");
    for _ in 0..80 {
        nested = format!("[{nested}]");
    }
    out.push(Hostile {
        file: "deep-document.json",
        contents: format!(
            "{{\"apiVersion\": \"weft.io/v1alpha1\", \"kind\": \"EnvoyConfig\", \"metadata\": {{\"name\": \"deep-document\", \"namespace\": \"default\"}}, \"spec\": {{\"resources\": [{{\"@type\": \"type.googleapis.com/envoy.config.cluster.v3.Cluster\", \"name\": \"c\", \"metadata\": {{\"filter_metadata\": {{\"x\": {{\"v\": {nested}}}}}}}}}]}}}}"
        )
        .into_bytes(),
        expect: vec!["EnvoyConfig default/deep-document", "at most 64 are accepted"],
    });

    // Huge names: the object's, and a resource's.
    out.push(Hostile {
        file: "huge-name.yaml",
        contents: config(&"a".repeat(300), "default", "  services: [{name: web}]\n").into_bytes(),
        expect: vec!["EnvoyConfig", "is not a valid object name (at most 253"],
    });
    out.push(Hostile {
        file: "huge-resource-name.yaml",
        contents: config(
            "huge-resource-name",
            "default",
            &format!(
                "  resources:\n  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: {}\n    type: EDS\n",
                "c".repeat(100_000)
            ),
        )
        .into_bytes(),
        expect: vec!["EnvoyConfig default/huge-resource-name", "at most 253 are accepted"],
    });

    // A document larger than etcd would ever store.
    out.push(Hostile {
        file: "huge-document.yaml",
        contents: format!(
            "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata:\n  name: huge-document\n  namespace: default\n  annotations: {{junk: \"{}\"}}\nspec: {{}}\n",
            "x".repeat(2 << 20)
        )
        .into_bytes(),
        expect: vec!["EnvoyConfig default/huge-document", "is larger than"],
    });

    // A YAML alias bomb (a billion "lol"s if expanded).
    let mut bomb = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for i in 1..9u8 {
        let (p, n) = ((b'a' + i - 1) as char, (b'a' + i) as char);
        let _ = writeln!(bomb, "{n}: &{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]");
    }
    out.push(Hostile {
        file: "alias-bomb.yaml",
        contents: format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: lol}}\ndata:\n  {}",
            bomb.replace('\n', "\n  ")
        )
        .into_bytes(),
        expect: vec!["alias-bomb.yaml", "not valid YAML"],
    });

    // Invalid UTF-8.
    let mut bad = config("not-utf8", "default", "  services: [{name: web}]\n").into_bytes();
    bad.extend_from_slice(b"# \xff\xfe\n");
    out.push(Hostile { file: "not-utf8.yaml", contents: bad, expect: vec!["not-utf8.yaml", "not UTF-8"] });

    // A duplicate key (the second document of the file is still read).
    out.push(Hostile {
        file: "duplicate-keys.yaml",
        contents: format!(
            "{}---\n{}",
            config("duplicate-keys", "default", "  services: [{name: web}]\n  services: [{name: other}]\n"),
            config("after-duplicate", "default", "  backendServices: [{name: web}]\n")
        )
        .into_bytes(),
        expect: vec!["duplicate-keys.yaml", "duplicate"],
    });

    // Out-of-range numbers: a Service port in an EnvoyConfig, an Envoy port.
    out.push(Hostile {
        file: "out-of-range.yaml",
        contents: config("big-service-port", "default", "  services: [{name: web, ports: [70000]}]\n").into_bytes(),
        expect: vec!["EnvoyConfig default/big-service-port", "spec.services[0].ports[0]"],
    });
    out.push(Hostile {
        file: "out-of-range-envoy.yaml",
        contents: format!(
            "apiVersion: weft.io/v1alpha1\nkind: ClusterwideEnvoyConfig\nmetadata: {{name: big-port}}\nspec:\n{}",
            routes_to(
                "default/far",
                "  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: default/far\n    load_assignment: {cluster_name: default/far, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.1.1.12, port_value: 70000}}}}]}]}\n"
            )
        )
        .into_bytes(),
        expect: vec!["ClusterwideEnvoyConfig big-port", "port_value: must be at most 65535, got 70000"],
    });

    // Tenancy: another namespace's cluster, the admin interface, another
    // namespace's Secret, the node's files and sockets.
    out.push(Hostile {
        file: "cross-namespace.yaml",
        contents: config("steal", "tenant-a", &routes_to("default/web", "")).into_bytes(),
        expect: vec!["EnvoyConfig tenant-a/steal", "is in namespace \"default\""],
    });
    out.push(Hostile {
        file: "admin.yaml",
        contents: config("admin", "default", &routes_to("envoy-admin", "")).into_bytes(),
        expect: vec!["EnvoyConfig default/admin", "admin interface: only a ClusterwideEnvoyConfig"],
    });
    out.push(Hostile {
        file: "other-secret.yaml",
        contents: config(
            "other-secret",
            "tenant-a",
            "  resources:\n  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: c\n    type: EDS\n    transport_socket:\n      name: tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        common_tls_context: {tls_certificate_sds_secret_configs: [{name: default/demo-cert}]}\n",
        )
        .into_bytes(),
        expect: vec!["EnvoyConfig tenant-a/other-secret", "secret \"default/demo-cert\" is in namespace \"default\""],
    });
    out.push(Hostile {
        file: "node-files.yaml",
        contents: config(
            "node-files",
            "default",
            &routes_to(
                "local",
                "  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: local\n    load_assignment: {cluster_name: local, endpoints: [{lb_endpoints: [{endpoint: {address: {pipe: {path: /var/run/weft/xds.sock}}}}]}]}\n",
            )
            .replace(
                "stat_prefix: l\n",
                "stat_prefix: l\n          access_log: [{name: f, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: /etc/cron.d/x}}]\n",
            ),
        )
        .into_bytes(),
        expect: vec!["EnvoyConfig default/node-files", "unix sockets are the node's"],
    });
    out
}
