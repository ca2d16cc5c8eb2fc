//! PublishMessage.

use super::encode;
use crate::destination::OutgoingRecord;
use crate::destination::oci::{OciClient, OciError};

pub async fn publish(
    client: &OciClient,
    topic_id: &str,
    record: &OutgoingRecord,
) -> Result<(), OciError> {
    let body = encode::body(record)?;
    let bytes = client
        .post(&["20181201", "topics", topic_id, "messages"], body, true)
        .await?;
    let answer: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| OciError::Decode(e.to_string()))?;
    if answer.get("messageId").and_then(|m| m.as_str()).is_some() {
        Ok(())
    } else {
        Err(OciError::Decode(format!("no messageId in {answer}")))
    }
}
