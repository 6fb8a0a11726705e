//! The message event a receiver gets: the seed guide's payload, as Rust types.
//!
//! The enums mirror the guide's field reference, so an event with an unknown
//! content type, message type, channel or status cannot be built.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Type of content (`data.content_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum ContentType {
    Text,
    Image,
    Video,
    Document,
    Audio,
}

/// Message type (`data.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum MessageType {
    UserInput,
    System,
    Bot,
}

/// Communication channel (`data.channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum Channel {
    Api,
    Whatsapp,
    Sms,
}

/// Message status (`data.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum MessageStatus {
    Received,
    Processed,
    Failed,
}

macro_rules! wire_names {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in the guide's order.
            pub const ALL: &'static [$ty] = &[$(<$ty>::$variant),+];

            /// The name on the wire, e.g. `"TEXT"`.
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),+ }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_uppercase().as_str() {
                    $($name => Ok(<$ty>::$variant),)+
                    _ => Err(format!(
                        "must be one of {} (got {s:?})",
                        [$($name),+].join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_names!(ContentType { Text => "TEXT", Image => "IMAGE", Video => "VIDEO", Document => "DOCUMENT", Audio => "AUDIO" });
wire_names!(MessageType { UserInput => "USER_INPUT", System => "SYSTEM", Bot => "BOT" });
wire_names!(Channel { Api => "API", Whatsapp => "WHATSAPP", Sms => "SMS" });
wire_names!(MessageStatus { Received => "RECEIVED", Processed => "PROCESSED", Failed => "FAILED" });

/// The `data` object of a webhook: one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The message id (`data.id`).
    pub id: Uuid,
    /// The message content.
    pub content: String,
    /// Type of content.
    pub content_type: ContentType,
    /// File name, for media messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Message type (`data.type`).
    #[serde(rename = "type")]
    pub message_type: MessageType,
    /// Communication channel.
    pub channel: Channel,
    /// Message status.
    pub status: MessageStatus,
    /// Custom metadata (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Id or name of the creator.
    pub created_by: String,
    /// Id or name of the last modifier.
    pub updated_by: String,
    /// Creation time.
    #[serde(with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// Last update time.
    #[serde(with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
}

impl Message {
    /// A message with the given id and content, type TEXT, USER_INPUT, API,
    /// RECEIVED, by `author`, created and updated at `at`.
    pub fn text(id: Uuid, content: impl Into<String>, author: impl Into<String>, at: DateTime<Utc>) -> Self {
        let author = author.into();
        Message {
            id,
            content: content.into(),
            content_type: ContentType::Text,
            filename: None,
            message_type: MessageType::UserInput,
            channel: Channel::Api,
            status: MessageStatus::Received,
            metadata: None,
            created_by: author.clone(),
            updated_by: author,
            created_at: at,
            updated_at: at,
        }
    }
}

/// One webhook event to enqueue: a message in a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageEvent {
    /// The conversation the message belongs to.
    pub conversation_id: Uuid,
    /// The message (`data`).
    pub message: Message,
    /// Events sharing a key are delivered one after another, oldest first.
    pub ordering_key: Option<String>,
}

/// The webhook body as the receiver gets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// The conversation id.
    pub conversation_id: Uuid,
    /// The message.
    pub data: Message,
    /// Event time.
    #[serde(with = "rfc3339")]
    pub timestamp: DateTime<Utc>,
}

/// RFC 3339 in UTC with a `Z`, milliseconds only when present.
pub(crate) mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_use_the_guide_names() {
        assert_eq!(serde_json::to_value(ContentType::Document).unwrap(), "DOCUMENT");
        assert_eq!(serde_json::to_value(MessageType::UserInput).unwrap(), "USER_INPUT");
        assert_eq!(serde_json::to_value(Channel::Whatsapp).unwrap(), "WHATSAPP");
        assert_eq!("processed".parse::<MessageStatus>().unwrap(), MessageStatus::Processed);
        let err = "EMAIL".parse::<Channel>().unwrap_err();
        assert!(err.contains("API, WHATSAPP, SMS"), "{err}");
    }

    #[test]
    fn message_serialises_like_the_guide() {
        let at = DateTime::parse_from_rfc3339("2024-03-21T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let m = Message::text(Uuid::nil(), "hi", "user123", at);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["type"], "USER_INPUT");
        assert_eq!(v["created_at"], "2024-03-21T10:00:00Z");
        assert!(v.get("filename").is_none());
        assert!(v.get("metadata").is_none());
    }
}
