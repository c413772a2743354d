//! The agent's HTTP API: `/status` (everything the components publish, as
//! JSON; what `weft status` shows), `/healthz`, `/readyz`, and `/metrics`
//! (the agent's registry: flow metrics, the pipeline's and the agent's own).
//! It only reads: every answer comes from [`Readers`].

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    http::{StatusCode, header},
    routing::get,
};
use prometheus_client::registry::Registry;

use super::status::Readers;

/// Serves the API on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, readers: Readers, registry: Registry) -> anyhow::Result<()> {
    let registry = Arc::new(registry);
    let (r1, r2) = (readers.clone(), readers);
    let app = Router::new()
        .route("/status", get(move || std::future::ready(Json(r1.status()))))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = r2.ready();
                async move {
                    if ready { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                std::future::ready((
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    encode(&registry),
                ))
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// The registry as Prometheus text.
pub fn encode(r: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r).expect("writing to a String");
    out
}
