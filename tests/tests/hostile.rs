//! Hostile input (issue 10): files a careless or malicious user could write
//! (`weft_tests::hostile`) are each reported by name, by `weft-agent
//! validate` and by running agents; no agent exits; good objects keep serving.

use std::{process::Command, time::Duration};

use weft_tests::{
    envoylab::EnvoyLab,
    hostile,
    http::get_once,
    objects::{LabService, agent_binary, http_envoy_config, lab_objects, wait_status, write_atomic},
    require_root,
    scenario::{T, VIP, sa},
};

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: demo-cert, namespace: default}\ntype: kubernetes.io/tls\ndata: {tls.crt: Y2VydA==, tls.key: a2V5}\n";

#[test]
fn validate_names_every_hostile_object_and_keeps_the_good_one() {
    let dir = std::env::temp_dir().join(format!("weft-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("good.yaml"), format!("{SERVICES}---\n{}", http_envoy_config("good", "web", None)))
        .unwrap();
    let files = hostile::files();
    for h in &files {
        std::fs::write(dir.join(h.file), &h.contents).unwrap();
    }
    let out = Command::new(agent_binary()).arg("validate").arg(&dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "problems, not a crash: {stderr}\n{stdout}");
    let mut missing = Vec::new();
    for h in &files {
        let named = stdout.lines().any(|l| l.contains(h.file) && h.expect.iter().all(|e| l.contains(e)));
        if !named {
            missing.push(format!("{}: no line with {:?}", h.file, h.expect));
        }
    }
    assert!(missing.is_empty(), "{}\n--- output:\n{stdout}", missing.join("\n"));
    assert!(!stdout.contains("EnvoyConfig default/good"), "the good config is valid:\n{stdout}");
    assert!(stderr.contains(" valid, "), "{stderr}");
}

#[test]
fn running_agents_report_hostile_objects_and_keep_serving() {
    require_root!();
    let web = LabService::new("web", VIP, 80, &["n1-p2", "n2-p1", "n2-p2"]);
    let env = EnvoyLab::new(|lab| {
        format!("{}{}", lab_objects(lab, std::slice::from_ref(&web)), http_envoy_config("web-l7", "web", None))
    });
    env.acked("EnvoyConfig default/web-l7");
    let client = env.lab.pod("n1-p1");
    let through_envoy = || {
        let (r, _, _) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("x-envoy-upstream-service-time").is_some(), "answered through Envoy: {r:?}");
    };
    through_envoy();

    let files = hostile::files();
    let dir = &env.files[0].objects_dir;
    for h in &files {
        std::fs::write(dir.join(h.file), &h.contents).unwrap();
    }
    // A Kubernetes object with an out-of-range port, and a bad new version of the good config.
    write_atomic(
        &dir.join("bad-service.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: huge-port, namespace: default}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 70000}]}\n",
    )
    .unwrap();
    let lab_yaml = lab_objects(&env.lab, std::slice::from_ref(&web));
    write_atomic(
        &env.objects_file(),
        &format!("{lab_yaml}{}", http_envoy_config("web-l7", "web", Some("{cluster: tenant-b/web}"))),
    )
    .unwrap();

    let all_reported = |s: &serde_json::Value| {
        let text = s.to_string();
        files.iter().all(|h| h.expect.iter().all(|e| text.contains(&e.replace('"', "\\\""))))
            && text.contains("huge-port: port 70000 is not a port number")
            && text.contains("last-good")
    };
    let status = wait_status(&env.lab, 0, Duration::from_secs(60), "every hostile object reported", all_reported)
        .unwrap_or_else(|e| env.fail(e));
    let web_l7 = status["control"]["objects"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["object"] == "EnvoyConfig default/web-l7"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(web_l7["serving"]["state"], "last-good", "{web_l7:#}");
    assert!(web_l7["problems"].to_string().contains("is in namespace \\\"tenant-b\\\""), "{web_l7:#}");
    for (i, pid) in env.pids.iter().enumerate() {
        assert!(env.lab.running(*pid), "agent {i} is still running");
    }
    // The good version keeps serving through Envoy, on both nodes' agents.
    through_envoy();
    wait_status(&env.lab, 1, Duration::from_secs(30), "node2 saw them too", all_reported)
        .unwrap_or_else(|e| env.fail(e));
}
