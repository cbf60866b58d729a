//! Go `encoding/json` decoding rules that flannel's formats depend on.
//!
//! Go matches object keys to struct fields case-insensitively and ignores unknown keys; operators'
//! existing `net-conf.json` files rely on that, so every reader of those formats goes through here.

use serde_json::{Map, Value};

/// An object whose keys are matched the way Go's decoder matches struct fields.
#[derive(Debug, Clone, Default)]
pub struct FoldedObject {
    entries: Vec<(String, Value)>,
    type_name: &'static str,
}

impl FoldedObject {
    /// Wraps a JSON object; `type_name` names the Go struct in error messages (e.g. `Config`).
    pub fn new(map: Map<String, Value>, type_name: &'static str) -> Self {
        FoldedObject {
            entries: map.into_iter().collect(),
            type_name,
        }
    }

    /// Decodes `text` as a JSON object, with Go's error wording for non-objects.
    pub fn parse(text: &str, type_name: &'static str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| go_syntax_error(&e))?;
        Self::from_value(value, type_name)
    }

    /// Accepts an already-decoded value, which must be an object (or null = empty object).
    pub fn from_value(value: Value, type_name: &'static str) -> Result<Self, String> {
        match value {
            Value::Object(map) => Ok(Self::new(map, type_name)),
            Value::Null => Ok(Self::new(Map::new(), type_name)),
            other => Err(format!(
                "json: cannot unmarshal {} into Go value of type {}",
                go_kind(&other),
                type_name
            )),
        }
    }

    /// The value for `field`: an exact-case key wins, otherwise the last case-insensitive match.
    pub fn get(&self, field: &str) -> Option<&Value> {
        if let Some((_, v)) = self.entries.iter().find(|(k, _)| k == field) {
            return Some(v);
        }
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(field))
            .map(|(_, v)| v)
    }

    /// The value for `field`, treating JSON `null` as absent (Go leaves the field untouched).
    pub fn get_non_null(&self, field: &str) -> Option<&Value> {
        self.get(field).filter(|v| !v.is_null())
    }

    /// A Go `bool` field.
    pub fn bool_field(&self, field: &str) -> Result<Option<bool>, String> {
        match self.get_non_null(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.type_error(field, other, "bool")),
        }
    }

    /// A Go `string` field.
    pub fn string_field(&self, field: &str) -> Result<Option<String>, String> {
        match self.get_non_null(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.type_error(field, other, "string")),
        }
    }

    /// A Go integer field with the given bounds (`go_type` names it in errors, e.g. `uint`).
    pub fn int_field(
        &self,
        field: &str,
        go_type: &str,
        min: i64,
        max: i64,
    ) -> Result<Option<i64>, String> {
        match self.get_non_null(field) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) if v >= min && v <= max => Ok(Some(v)),
                _ => Err(format!(
                    "json: cannot unmarshal number {} into Go struct field {}.{} of type {}",
                    n, self.type_name, field, go_type
                )),
            },
            Some(other) => Err(self.type_error(field, other, go_type)),
        }
    }

    /// Go's message for a JSON value of the wrong type.
    pub fn type_error(&self, field: &str, value: &Value, go_type: &str) -> String {
        format!(
            "json: cannot unmarshal {} into Go struct field {}.{} of type {}",
            go_kind(value),
            self.type_name,
            field,
            go_type
        )
    }
}

/// Go's name for the kind of a JSON value, as used in its unmarshal errors.
pub fn go_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Renders a serde_json syntax error in Go's wording where the two differ noticeably.
pub fn go_syntax_error(e: &serde_json::Error) -> String {
    if e.is_eof() {
        "unexpected end of JSON input".to_string()
    } else {
        format!("invalid JSON: {e}")
    }
}

/// The raw text of a JSON string value or of any other literal, as Go's custom unmarshalers see it
/// after trimming quotes (flannel's IP types do `bytes.Trim(j, "\"")`).
pub fn trimmed_literal(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_case_wins_over_folded_match() {
        let o = FoldedObject::parse(r#"{"network":"a","Network":"b"}"#, "Config").unwrap();
        assert_eq!(o.get("Network"), Some(&Value::String("b".into())));
        let o = FoldedObject::parse(r#"{"NETWORK":"a"}"#, "Config").unwrap();
        assert_eq!(o.get("Network"), Some(&Value::String("a".into())));
    }

    #[test]
    fn wrong_type_gives_go_message() {
        let o = FoldedObject::parse(r#"{"SubnetLen":"24"}"#, "Config").unwrap();
        assert_eq!(
            o.int_field("SubnetLen", "uint", 0, u32::MAX as i64)
                .unwrap_err(),
            "json: cannot unmarshal string into Go struct field Config.SubnetLen of type uint"
        );
    }
}
