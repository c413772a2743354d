//! The control plane with the real Envoy in the lab (issue: control plane):
//! EnvoyConfigs from the objects directory become validated xDS, the agent's
//! Envoy serves the redirected Services, and bad objects are rejected alone.

use std::time::Duration;

use weft_tests::{
    http::{HttpServer, ServerOpts, get_once},
    lab::Lab,
    objects::{
        AgentFiles, LabService, agent_files, envoy_stat, envoy_state, http_envoy_config, lab_objects, start_agent,
        wait_ready, wait_status, write_atomic,
    },
    require_root,
    scenario::{T, VIP, sa},
};

/// A lab with HTTP servers in three pods and agents (with Envoy) on both nodes.
struct EnvoyLab {
    lab: Lab,
    files: Vec<AgentFiles>,
    pids: Vec<u32>,
    _servers: Vec<HttpServer>,
}

impl EnvoyLab {
    fn new(objects: impl Fn(&Lab) -> String) -> Self {
        let lab = Lab::new().unwrap();
        let objects = objects(&lab);
        let servers = ["n1-p2", "n2-p1", "n2-p2"]
            .iter()
            .map(|p| {
                let pod = lab.pod(p);
                HttpServer::start(
                    &pod.netns,
                    sa(pod.ip, 8080),
                    ServerOpts { name: p.to_string(), ..Default::default() },
                )
                .unwrap()
            })
            .collect();
        let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, "").unwrap()).collect();
        write_atomic(&files[0].objects_dir.join("lab.yaml"), &objects).unwrap();
        let mut pids = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let log = lab.run_dir.join(format!("agent{i}.log"));
            pids.push(start_agent(&lab, i, f, &log).unwrap());
        }
        let me = Self { lab, files, pids, _servers: servers };
        for i in 0..2 {
            wait_ready(&me.files[i], Duration::from_secs(30), || me.lab.running(me.pids[i]))
                .unwrap_or_else(|e| me.fail(e));
        }
        me
    }

    fn fail(&self, e: impl std::fmt::Display) -> ! {
        let log = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let ready =
            weft_tests::http::Client::connect(&self.lab.node(0).netns, "127.0.0.1:9901".parse().unwrap(), None, T)
                .and_then(|mut c| c.get("admin", "/ready", &[("connection", "close")]));
        panic!(
            "{e}\n--- envoy /ready: {ready:?}\n--- agent log\n{}\n--- envoy log\n{}",
            log(self.lab.run_dir.join("agent0.log")),
            log(self.files[0].state_dir.join("envoy.log"))
        );
    }

    /// Waits until node1's agent says Envoy acknowledged `object`.
    fn acked(&self, object: &str) -> serde_json::Value {
        wait_status(&self.lab, 0, Duration::from_secs(30), &format!("{object} acknowledged"), |s| {
            s["envoy"]["ready"] == true && envoy_state(s, object) == Some("acknowledged")
        })
        .unwrap_or_else(|e| self.fail(e))
    }

    fn objects_file(&self) -> std::path::PathBuf {
        self.files[0].objects_dir.join("lab.yaml")
    }
}

fn web() -> LabService {
    LabService::new("web", VIP, 80, &["n1-p2", "n2-p1", "n2-p2"])
}

#[test]
fn an_l7_service_is_answered_through_envoy_and_falls_back_when_deleted() {
    require_root!();
    let env =
        EnvoyLab::new(|lab| format!("{}{}", lab_objects(lab, &[web()]), http_envoy_config("web-l7", "web", None)));
    let status = env.acked("EnvoyConfig default/web-l7");
    let port = status["control"]["objects"][0]["listeners"][0][1].as_u64().unwrap();
    assert!((10000..=20000).contains(&port), "{status:#}");

    let client = env.lab.pod("n1-p1");
    let (resp, _, peer) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap_or_else(|e| env.fail(e));
    assert_eq!(resp.status, 200);
    assert_eq!(peer, sa(VIP, 80));
    assert!(resp.header("x-envoy-upstream-service-time").is_some(), "answered through Envoy: {resp:?}");
    let backend_saw: std::net::SocketAddr = resp.field("peer").unwrap().parse().unwrap();
    assert_eq!(backend_saw.ip().to_string(), "192.168.50.1", "the backend sees Envoy on node1");
    assert!(envoy_stat(&env.lab, 0, "cluster.default/web.upstream_rq_total") >= 1, "Envoy's stats show the request");

    // Deleting the config returns the Service to plain eBPF load-balancing.
    write_atomic(&env.objects_file(), &lab_objects(&env.lab, &[web()])).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (resp, _, _) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap_or_else(|e| env.fail(e));
        if resp.header("x-envoy-upstream-service-time").is_none() {
            let backend_saw: std::net::SocketAddr = resp.field("peer").unwrap().parse().unwrap();
            assert_eq!(backend_saw.ip().to_string(), client.ip.to_string(), "DNAT: the backend sees the client");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still going through Envoy");
        std::thread::sleep(Duration::from_millis(100));
    }
}
