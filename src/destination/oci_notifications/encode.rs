//! Record -> PublishMessage body.

use serde_json::json;

use super::{MAX_MESSAGE_BYTES, MAX_TITLE_BYTES};
use crate::destination::OutgoingRecord;
use crate::destination::oci::OciError;
use crate::record::truncate_to_fit;

/// `fnrelay: <function id> success|failure`, cut to the title limit.
pub fn title(record: &OutgoingRecord) -> String {
    let mut t = format!(
        "fnrelay: {} {}",
        record.function_id,
        record.destination_type.lower()
    );
    if t.len() > MAX_TITLE_BYTES {
        let mut cut = MAX_TITLE_BYTES - 3;
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        t.truncate(cut);
        t.push_str("...");
    }
    t
}

/// The request body, within the message limit.
pub fn body(record: &OutgoingRecord) -> Result<Vec<u8>, OciError> {
    let title = title(record);
    let room = MAX_MESSAGE_BYTES - title.len();
    let text = String::from_utf8_lossy(&record.body);
    // JSON escaping of the record inside the body string costs bytes too.
    let escaped = |s: &str| serde_json::to_string(s).map_or(usize::MAX, |q| q.len() - 2);
    let fitted = if escaped(&text) <= room {
        text.into_owned()
    } else {
        let overhead = escaped(&text) - text.len();
        truncate_to_fit(&text, room.saturating_sub(overhead)).ok_or(OciError::TooLarge {
            size: record.body.len(),
            limit: MAX_MESSAGE_BYTES,
        })?
    };
    Ok(serde_json::to_vec(&json!({"title": title, "body": fitted})).expect("JSON serializes"))
}
