//! Record -> PutMessages entries.

use serde_json::{Value, json};

use super::MAX_MESSAGE_BYTES;
use crate::destination::OutgoingRecord;
use crate::record::truncate_to_fit;

/// A record too large even after truncating errorMessage.
#[derive(Debug)]
pub struct Oversize {
    pub size: usize,
    pub limit: usize,
}

/// The record as sent: errorMessage truncated (with a marker) if the JSON
/// is over the message limit.
pub fn fit(record: &OutgoingRecord) -> Result<OutgoingRecord, Oversize> {
    if record.body.len() <= MAX_MESSAGE_BYTES {
        return Ok(record.clone());
    }
    let text = String::from_utf8_lossy(&record.body);
    let cut = truncate_to_fit(&text, MAX_MESSAGE_BYTES).ok_or(Oversize {
        size: record.body.len(),
        limit: MAX_MESSAGE_BYTES,
    })?;
    let mut out = record.clone();
    out.body = cut.into_bytes().into();
    Ok(out)
}

/// One PutMessages entry.
pub fn entry(record: &OutgoingRecord) -> Value {
    let content = String::from_utf8_lossy(&record.body);
    match &record.channel_id {
        Some(channel) => json!({"content": content, "metadata": {"channelId": channel}}),
        None => json!({"content": content}),
    }
}

/// Bytes an entry adds to a request (content, channel and JSON overhead).
pub fn size(record: &OutgoingRecord) -> usize {
    // The content is a JSON string inside JSON: quotes double up when escaped.
    let escaped = record
        .body
        .iter()
        .filter(|b| **b == b'"' || **b == b'\\')
        .count();
    record.body.len() + escaped + record.channel_id.as_ref().map_or(0, |c| c.len() + 32) + 32
}

/// The request body.
pub fn body(records: &[OutgoingRecord]) -> Vec<u8> {
    let entries: Vec<Value> = records.iter().map(entry).collect();
    serde_json::to_vec(&json!({ "messages": entries })).expect("JSON serializes")
}
