//! Record -> PutMessages entries (base64 key and value).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::destination::OutgoingRecord;
use crate::record::truncate_to_fit;

/// The record as sent: errorMessage truncated if over the value limit.
pub fn fit(record: &OutgoingRecord) -> Result<OutgoingRecord, (usize, usize)> {
    if record.body.len() <= MAX_VALUE_BYTES {
        return Ok(record.clone());
    }
    let text = String::from_utf8_lossy(&record.body);
    let cut =
        truncate_to_fit(&text, MAX_VALUE_BYTES).ok_or((record.body.len(), MAX_VALUE_BYTES))?;
    let mut out = record.clone();
    out.body = cut.into_bytes().into();
    Ok(out)
}

/// The partition key: functionId, or its SHA-256 (hex) if over 256 bytes,
/// so one function's records still share a partition.
pub fn key(record: &OutgoingRecord) -> Vec<u8> {
    let id = record.function_id.as_bytes();
    if id.len() <= MAX_KEY_BYTES {
        id.to_vec()
    } else {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id);
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes()
    }
}

/// Decoded bytes an entry adds to a request.
pub fn size(record: &OutgoingRecord) -> usize {
    key(record).len() + record.body.len()
}

/// The request body.
pub fn body(records: &[OutgoingRecord]) -> Vec<u8> {
    let entries: Vec<Value> = records
        .iter()
        .map(|r| json!({"key": STANDARD.encode(key(r)), "value": STANDARD.encode(&r.body)}))
        .collect();
    serde_json::to_vec(&json!({ "messages": entries })).expect("JSON serializes")
}
