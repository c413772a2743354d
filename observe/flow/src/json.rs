//! The flow API's messages as JSON with Hubble's field names (`IP`,
//! `pod_name`, `is_reply`...), both ways: what `weft observe -o json` prints,
//! and the FlowFilters `--allowlist`/`--denylist` and the OTLP exporter's
//! `filters` are written in. Done by reflection over the compiled descriptors
//! (prost-reflect), so every message of the API is covered without code per
//! message.

use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::proto::{self, flow::FlowFilter, observer::GetFlowsResponse};

/// The descriptors of the flow API.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(proto::DESCRIPTOR_SET).expect("the compiled descriptors decode"))
}

/// Any protobuf message of the flow API as one line of JSON with Hubble's
/// field names; `full_name` is its protobuf name (`flow.FlowFilter`).
pub fn message<M: Message>(full_name: &str, m: &M) -> String {
    let desc = pool().get_message_by_name(full_name).expect("a message of the flow API");
    let dynamic = DynamicMessage::decode(desc, m.encode_to_vec().as_slice()).expect("re-decoding our own message");
    let opts = SerializeOptions::new().use_proto_field_name(true).skip_default_fields(true);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic.serialize_with_options(&mut ser, &opts).expect("JSON of a message");
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// A response as one line of JSON.
pub fn response(r: &GetFlowsResponse) -> String {
    message("observer.GetFlowsResponse", r)
}

/// JSON that is not a FlowFilter: a field, value or type the message does not
/// have (the message names it), or values that do not make one.
#[derive(Debug, thiserror::Error)]
pub enum FlowFilterError {
    #[error("not a FlowFilter: {0}")]
    Json(serde_json::Error),
    #[error("not a FlowFilter: {0}")]
    Decode(prost::DecodeError),
}

/// A FlowFilter written as JSON with Hubble's field names (what `hubble
/// observe --allowlist` takes): `{"verdict": ["DROPPED"], "source_pod": ["shop/"]}`.
pub fn flow_filter(v: &serde_json::Value) -> Result<FlowFilter, FlowFilterError> {
    let desc = pool().get_message_by_name("flow.FlowFilter").expect("flow.FlowFilter is in the API");
    let m = DynamicMessage::deserialize(desc, v.clone()).map_err(FlowFilterError::Json)?;
    m.transcode_to::<FlowFilter>().map_err(FlowFilterError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flow::Verdict;

    #[test]
    fn filters_read_from_hubble_json() {
        let f = flow_filter(
            &serde_json::json!({"verdict": ["DROPPED"], "source_pod": ["shop/"], "event_type": [{"type": 129}]}),
        )
        .unwrap();
        assert_eq!(f.verdict, [Verdict::Dropped as i32]);
        assert_eq!(f.source_pod, ["shop/"]);
        assert_eq!(f.event_type[0].r#type, 129);
        assert!(flow_filter(&serde_json::json!({"verdikt": ["DROPPED"]})).unwrap_err().to_string().contains("verdikt"));
    }
}
