//! Record -> XADD command.

use crate::destination::OutgoingRecord;

/// `XADD key [MAXLEN ~ n] * id <id> key <functionId> record <json>`
pub fn xadd(stream_key: &str, maxlen: Option<u64>, record: &OutgoingRecord) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream_key);
    if let Some(n) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*")
        .arg("id")
        .arg(&record.id)
        .arg("key")
        .arg(&record.function_id)
        .arg("record")
        .arg(record.body.as_ref());
    cmd
}
