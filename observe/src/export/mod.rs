//! Exporters: each is a sink the pipeline hands every batch of flows to.
//! [`metrics`] counts them for Prometheus (and reports the pipeline's own
//! counters); [`otlp`] sends them to an OpenTelemetry collector as logs and
//! spans.

pub mod metrics;
pub mod otlp;
