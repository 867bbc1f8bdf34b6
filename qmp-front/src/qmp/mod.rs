//! QMP protocol layer and typed command schema, independent of the block
//! engine. A daemon owns one [`dispatch::Registry`] (its commands and
//! events) and one [`protocol::Session`] per monitor connection.

pub mod dispatch;
pub mod json_out;
pub mod json_stream;
pub mod keyval;
pub mod protocol;
pub mod schema;
