//! The three PATCH flavours: RFC 6902 JSON patch, RFC 7386 merge patch and Kubernetes'
//! strategic merge patch (for the fields that matter here).

use serde_json::{Map, Value};

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer {path:?}"));
    };
    Ok(rest.split('/').map(unescape).collect())
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let i: usize = token
        .parse()
        .map_err(|_| format!("invalid array index {token:?}"))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(format!("array index {i} out of bounds"));
    }
    Ok(i)
}

fn parent<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("missing path element {t:?}"))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(format!("path element {t:?} is not a container")),
        };
    }
    Ok(cur)
}

fn get_at(doc: &Value, tokens: &[String]) -> Result<Value, String> {
    let ptr: String = tokens
        .iter()
        .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
        .collect();
    doc.pointer(&ptr)
        .cloned()
        .ok_or_else(|| format!("path {ptr:?} does not exist"))
}

fn add_at(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), String> {
    let Some((last, init)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent(doc, init)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => return Err(format!("cannot add {last:?} to a non-container")),
    }
    Ok(())
}

fn remove_at(doc: &mut Value, tokens: &[String]) -> Result<Value, String> {
    let Some((last, init)) = tokens.split_last() else {
        return Err("cannot remove the whole document".into());
    };
    match parent(doc, init)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| format!("unable to remove nonexistent key: {last}")),
        Value::Array(a) => {
            let i = array_index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(format!("cannot remove {last:?} from a non-container")),
    }
}

/// RFC 6902 JSON patch (add, remove, replace, move, copy, test), applied atomically.
pub(crate) fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Array(ops) = patch else {
        return Err("a JSON patch must be an array of operations".into());
    };
    let mut work = doc.clone();
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("operation without a path")?;
        let tokens = pointer_tokens(path)?;
        let value = || op.get("value").cloned().ok_or("operation without a value");
        let from = || -> Result<Vec<String>, String> {
            pointer_tokens(
                op.get("from")
                    .and_then(Value::as_str)
                    .ok_or("operation without from")?,
            )
        };
        match name {
            "add" => add_at(&mut work, &tokens, value()?)?,
            "remove" => {
                remove_at(&mut work, &tokens)?;
            }
            "replace" => {
                get_at(&work, &tokens)?;
                if tokens.is_empty() {
                    work = value()?;
                } else {
                    remove_at(&mut work, &tokens)?;
                    add_at(&mut work, &tokens, value()?)?;
                }
            }
            "move" => {
                let v = remove_at(&mut work, &from()?)?;
                add_at(&mut work, &tokens, v)?;
            }
            "copy" => {
                let v = get_at(&work, &from()?)?;
                add_at(&mut work, &tokens, v)?;
            }
            "test" => {
                if get_at(&work, &tokens)? != value()? {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    *doc = work;
    Ok(())
}

enum ListStrategy {
    MergeBy(&'static str),
    MergePrimitive,
    Replace,
}

/// The patch strategy of a list field, by its path (list indices left out).
fn list_strategy(path: &[String]) -> ListStrategy {
    let full = path.join(".");
    match full.as_str() {
        "status.conditions" | "status.addresses" => return ListStrategy::MergeBy("type"),
        "status.volumesAttached" | "status.containerStatuses" | "status.initContainerStatuses" => {
            return ListStrategy::MergeBy("name")
        }
        "metadata.ownerReferences" => return ListStrategy::MergeBy("uid"),
        "metadata.finalizers" => return ListStrategy::MergePrimitive,
        _ => {}
    }
    match path.last().map(String::as_str) {
        Some("containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env")
        | Some("imagePullSecrets") => ListStrategy::MergeBy("name"),
        Some("volumeMounts") => ListStrategy::MergeBy("mountPath"),
        Some("ports") if path.iter().any(|p| p.ends_with("ontainers")) => {
            ListStrategy::MergeBy("containerPort")
        }
        _ => ListStrategy::Replace,
    }
}

fn is_directive(k: &str) -> bool {
    k.starts_with('$')
}

/// A patch value with its directives removed (what ends up stored when nothing merges).
fn clean(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !is_directive(k))
                .map(|(k, v)| (k.clone(), clean(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|e| e.get("$patch").is_none())
                .map(clean)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn patch_directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

/// Kubernetes strategic merge patch: maps merge recursively, `null` deletes, lists with a
/// merge key merge element by element, other lists replace; `$patch: replace|delete|merge`,
/// `$deleteFromPrimitiveList/<k>`, `$retainKeys` and `$setElementOrder/<k>` (ignored) are
/// understood.
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    let mut path = Vec::new();
    smp_map(target, patch, &mut path)
}

fn smp_map(target: &mut Value, patch: &Value, path: &mut Vec<String>) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = clean(patch);
        return Ok(());
    };
    match patch_directive(patch) {
        Some("replace") => {
            *target = clean(patch);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch type: {other}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if is_directive(k) {
            continue;
        }
        if v.is_null() || patch_directive(v) == Some("delete") {
            t.remove(k);
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Object(_) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                smp_map(slot, v, path)?;
            }
            Value::Array(items) => {
                let old = t.remove(k).and_then(|o| match o {
                    Value::Array(a) => Some(a),
                    _ => None,
                });
                t.insert(k.clone(), Value::Array(smp_list(old, items, path)?));
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
        path.pop();
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (t.get_mut(field), v) {
                list.retain(|e| !del.contains(e));
            }
        }
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

fn smp_list(
    old: Option<Vec<Value>>,
    items: &[Value],
    path: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    if items.iter().any(|e| patch_directive(e) == Some("replace")) {
        return Ok(items
            .iter()
            .filter(|e| patch_directive(e).is_none())
            .map(clean)
            .collect());
    }
    let mut out = old.unwrap_or_default();
    match list_strategy(path) {
        ListStrategy::Replace => Ok(items.iter().map(clean).collect()),
        ListStrategy::MergePrimitive => {
            for e in items {
                if !out.contains(e) {
                    out.push(e.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeBy(key) => {
            for e in items {
                let Some(kv) = e.get(key) else {
                    return Err(format!(
                        "map: {e} does not contain declared merge key: {key}"
                    ));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                match (patch_directive(e), pos) {
                    (Some("delete"), Some(i)) => {
                        out.remove(i);
                    }
                    (Some("delete"), None) => {}
                    (_, Some(i)) => smp_map(&mut out[i], e, path)?,
                    (_, None) => out.push(clean(e)),
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_conditions_merge_by_type() {
        let mut n = json!({"metadata": {"annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "images": [{"names": ["x"]}]}});
        strategic_merge(
            &mut n,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}},
                "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"},
                                          {"type": "Ready", "reason": "R"}],
                           "images": [{"names": ["y"]}]}}),
        )
        .unwrap();
        assert_eq!(
            n,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "R"},
                                          {"type": "NetworkUnavailable", "status": "False"}],
                           "images": [{"names": ["y"]}]}})
        );
        strategic_merge(
            &mut n,
            &json!({"status": {"conditions": [{"type": "Ready", "$patch": "delete"}]}}),
        )
        .unwrap();
        assert_eq!(n["status"]["conditions"].as_array().unwrap().len(), 1);
        strategic_merge(
            &mut n,
            &json!({"status": {"conditions": [{"$patch": "replace"}, {"type": "X"}]}}),
        )
        .unwrap();
        assert_eq!(n["status"]["conditions"], json!([{"type": "X"}]));
    }

    #[test]
    fn merge_and_json_patch() {
        let mut d = json!({"a": {"b": 1, "c": [1, 2]}, "x": 1});
        merge_patch(&mut d, &json!({"a": {"b": null, "c": [3]}, "y": 2}));
        assert_eq!(d, json!({"a": {"c": [3]}, "x": 1, "y": 2}));
        json_patch(
            &mut d,
            &json!([{"op": "add", "path": "/a/c/-", "value": 4},
                    {"op": "replace", "path": "/x", "value": "z"},
                    {"op": "move", "from": "/y", "path": "/m~1n"},
                    {"op": "test", "path": "/a/c/1", "value": 4}]),
        )
        .unwrap();
        assert_eq!(d, json!({"a": {"c": [3, 4]}, "x": "z", "m/n": 2}));
        let before = d.clone();
        assert!(json_patch(
            &mut d,
            &json!([{"op": "remove", "path": "/x"}, {"op": "remove", "path": "/nope"}])
        )
        .is_err());
        assert_eq!(d, before, "a failed patch changes nothing");
    }
}
