//! The one fault of the Kubernetes API the real control plane cannot be made
//! to produce on demand (weft_tests::k8s::fake): a list that fails between
//! its pages. Nothing of such a list is applied: the objects held stay the
//! last complete list's until a whole list is in.

use std::time::{Duration, Instant};

use serde_json::json;
use weft_agent::k8s::watch::{Kinds, KubeSource};
use weft_tests::k8s::fake::FakeApiServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_cut_between_its_pages_is_never_applied() {
    let server = FakeApiServer::start().await.unwrap();
    // More than one page (kube-rs lists 500 at a time).
    for i in 0..600 {
        server.put_service(&format!("s{i:03}"), json!({"v": "0"}));
    }
    let mut src = KubeSource::start(server.client(), Kinds { services: true, ..Kinds::none() }, "node1").await;
    tokio::time::timeout(Duration::from_secs(30), src.wait_synced(Duration::from_secs(5))).await.unwrap();
    assert_eq!(src.poll().expect("the first list").objects.services.len(), 600);
    let first_lists = server.requests().iter().filter(|r| !r.is_watch() && !r.is_continued()).count();

    // The watch expires; the relist's second page fails; the watcher lists again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.requests().iter().any(|r| r.is_watch()) {
        assert!(Instant::now() < deadline, "no watch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.fail_next_page();
    server.expire_watches();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while src.stats()["Service"].lists < 2 {
        assert!(Instant::now() < deadline, "no second complete list: {:?}", src.stats());
        if let Some(l) = src.poll() {
            seen.push(l.objects.services.len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(l) = src.poll() {
        seen.push(l.objects.services.len());
    }
    assert!(seen.iter().all(|n| *n == 600), "a partial list was applied: {seen:?}");
    assert_eq!(src.snapshot().objects.services.len(), 600);
    let log = server.requests();
    assert!(log.iter().any(|r| r.is_continued() && r.status == 410), "the page failed: {log:?}");
    let lists = log.iter().filter(|r| !r.is_watch() && !r.is_continued()).count();
    assert!(lists >= first_lists + 2, "listed again from the first page after the failure ({lists} lists)");
    let stats = src.stats()["Service"].clone();
    assert!(stats.errors >= 2, "the 410 of the watch and of the page: {stats:?}");

    // And it goes on watching.
    server.put_service("s000", json!({"v": "1"}));
    server.delete_service("s599");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = src.snapshot();
        let v0 = l.objects.services.values().find(|s| s.object.metadata.name.as_deref() == Some("s000"));
        let v0 = v0.and_then(|s| s.object.metadata.annotations.as_ref()?.get("v").cloned());
        if l.objects.services.len() == 599 && v0.as_deref() == Some("1") {
            break;
        }
        assert!(Instant::now() < deadline, "the changes after the relist never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
