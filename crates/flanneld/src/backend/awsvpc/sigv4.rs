//! AWS Signature Version 4, written against the shared HMAC helpers instead of pulling in the
//! AWS SDK (see the README's aws-vpc section for the build-time figures behind that choice).
//!
//! Only what the EC2 Query API needs: a method, a path, a query, the headers to sign and the
//! body. Checked against AWS's published signature test suite in the tests below.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::cloud::{hex, hmac_sha256, sha256_hex, Secret};

/// AWS credentials; the secret parts never print.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The access key id (`AKIA...`, `ASIA...`): not secret, but not logged either.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: Secret,
    /// The session token of temporary credentials (instance profile, STS).
    pub session_token: Option<Secret>,
}

/// A moment as SigV4 writes it: `20150830T123600Z` and its date `20150830`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmzDate {
    /// `YYYYMMDDTHHMMSSZ`, the `X-Amz-Date` header.
    pub timestamp: String,
    /// `YYYYMMDD`, the credential scope's date.
    pub date: String,
}

impl AmzDate {
    /// The current UTC time.
    pub fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self::from_unix(secs)
    }

    /// The UTC time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: u64) -> Self {
        let (y, m, d, h, mi, s) = crate::utc::utc_civil(secs);
        let date = format!("{y:04}{m:02}{d:02}");
        let timestamp = format!("{date}T{h:02}{mi:02}{s:02}Z");
        AmzDate { timestamp, date }
    }
}

/// RFC 3986 percent-encoding as SigV4 wants it: everything but `A-Z a-z 0-9 - _ . ~`.
pub fn uri_encode(s: &str) -> String {
    crate::backend::cloud::percent_encode(s)
}

/// One request to sign.
pub struct SignRequest<'a> {
    /// `GET`, `POST`.
    pub method: &'a str,
    /// The (already encoded) path, e.g. `/`.
    pub path: &'a str,
    /// Query parameters, unencoded; sorted and encoded here.
    pub query: &'a [(String, String)],
    /// Headers to sign (name, value); `host` and `x-amz-date` must be among them.
    pub headers: &'a [(String, String)],
    /// The body.
    pub payload: &'a [u8],
}

/// Where and as whom a request is signed.
pub struct Scope<'a> {
    /// e.g. `us-east-1`.
    pub region: &'a str,
    /// e.g. `ec2`.
    pub service: &'a str,
    /// The request time.
    pub date: &'a AmzDate,
}

/// The canonical request (task 1 of the signing process) and its signed-headers list.
pub fn canonical_request(req: &SignRequest<'_>) -> (String, String) {
    let mut query: Vec<(String, String)> = req
        .query
        .iter()
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in req.headers {
        let name = name.to_ascii_lowercase();
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        match headers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => {
                v.push(',');
                v.push_str(&value);
            }
            None => headers.push((name, value)),
        }
    }
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let signed = headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let path = if req.path.is_empty() { "/" } else { req.path };
    let creq = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        path,
        query,
        canonical_headers,
        signed,
        sha256_hex(req.payload)
    );
    (creq, signed)
}

/// The `Authorization` header value for `req`.
pub fn authorization(creds: &Credentials, scope: &Scope<'_>, req: &SignRequest<'_>) -> String {
    let (creq, signed) = canonical_request(req);
    let credential_scope = format!(
        "{}/{}/{}/aws4_request",
        scope.date.date, scope.region, scope.service
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{credential_scope}\n{}",
        scope.date.timestamp,
        sha256_hex(creq.as_bytes())
    );
    let secret = format!("AWS4{}", creds.secret_access_key.expose());
    let k_date = hmac_sha256(secret.as_bytes(), scope.date.date.as_bytes());
    let k_region = hmac_sha256(&k_date, scope.region.as_bytes());
    let k_service = hmac_sha256(&k_region, scope.service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{credential_scope}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key_id
    )
}

#[cfg(test)]
mod tests {
    //! Vectors of AWS's published "Signature Version 4 test suite" (region us-east-1, service
    //! `service`, 2015-08-30T12:36:00Z, the documentation's example key).
    use super::*;

    fn creds(token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: token.map(Secret::new),
        }
    }

    fn sign(method: &str, query: &[(&str, &str)], extra: &[(&str, &str)], body: &str) -> String {
        let date = AmzDate::from_unix(1_440_938_160);
        assert_eq!(date.timestamp, "20150830T123600Z");
        let mut headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), date.timestamp.clone()),
        ];
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let token = extra
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-security-token"))
            .map(|(_, v)| *v);
        authorization(
            &creds(token),
            &Scope {
                region: "us-east-1",
                service: "service",
                date: &date,
            },
            &SignRequest {
                method,
                path: "/",
                query: &query,
                headers: &headers,
                payload: body.as_bytes(),
            },
        )
    }

    fn signature(authz: &str) -> &str {
        authz.rsplit("Signature=").next().unwrap_or("")
    }

    #[test]
    fn get_vanilla() {
        let a = sign("GET", &[], &[], "");
        assert_eq!(
            a,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn get_vanilla_query_order_key_case() {
        let a = sign(
            "GET",
            &[("Param2", "value2"), ("Param1", "value1")],
            &[],
            "",
        );
        assert_eq!(
            signature(&a),
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
    }

    #[test]
    fn get_vanilla_utf8_query() {
        let a = sign("GET", &[("\u{1234}", "bar")], &[], "");
        assert_eq!(
            signature(&a),
            "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04"
        );
    }

    #[test]
    fn get_header_value_trim() {
        let a = sign(
            "GET",
            &[],
            &[("My-Header1", " value1"), ("My-Header2", " \"a   b   c\"")],
            "",
        );
        assert_eq!(
            signature(&a),
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"
        );
    }

    #[test]
    fn post_vanilla_and_query() {
        assert_eq!(
            signature(&sign("POST", &[], &[], "")),
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
        assert_eq!(
            signature(&sign("POST", &[("Param1", "value1")], &[], "")),
            "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11"
        );
    }

    #[test]
    fn post_x_www_form_urlencoded_parameters() {
        // The suite's canonical request for this case is matched exactly. Its published `authz`
        // was computed from a different canonical request than the one it ships (a known defect
        // of the suite), so the signature checked is the one its shipped `creq` yields.
        let date = AmzDate::from_unix(1_440_938_160);
        let headers: Vec<(String, String)> = [
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
            ("Content-Length", "13"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let req = SignRequest {
            method: "POST",
            path: "/",
            query: &[],
            headers: &headers,
            payload: b"Param1=value1",
        };
        let (creq, _) = canonical_request(&req);
        assert_eq!(
            creq,
            "POST\n/\n\ncontent-length:13\ncontent-type:application/x-www-form-urlencoded; charset=utf-8\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\ncontent-length;content-type;host;x-amz-date\n9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
        );
        let scope = Scope {
            region: "us-east-1",
            service: "service",
            date: &date,
        };
        assert_eq!(
            signature(&authorization(&creds(None), &scope, &req)),
            "2b9566917226a17022b710430a367d343cbff33af7ee50b0ff8f44d75a4a46d8"
        );
    }

    #[test]
    fn post_sts_header_before() {
        let token = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";
        let a = sign("POST", &[], &[("X-Amz-Security-Token", token)], "");
        assert!(a.contains("SignedHeaders=host;x-amz-date;x-amz-security-token,"));
        assert_eq!(
            signature(&a),
            "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
        );
    }

    #[test]
    fn canonical_request_of_the_suite() {
        let date = AmzDate::from_unix(1_440_938_160);
        let headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), date.timestamp.clone()),
        ];
        let (creq, signed) = canonical_request(&SignRequest {
            method: "GET",
            path: "/",
            query: &[],
            headers: &headers,
            payload: b"",
        });
        assert_eq!(signed, "host;x-amz-date");
        assert_eq!(
            creq,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(AmzDate::from_unix(0).timestamp, "19700101T000000Z");
        // 2024-02-29 23:59:59 UTC (a leap day).
        assert_eq!(
            AmzDate::from_unix(1_709_251_199).timestamp,
            "20240229T235959Z"
        );
        assert_eq!(AmzDate::from_unix(1_709_251_200).date, "20240301");
    }

    #[test]
    fn encoding() {
        assert_eq!(uri_encode("a b/c~d_e.f-g"), "a%20b%2Fc~d_e.f-g");
        assert_eq!(uri_encode("10.0.0.0/24"), "10.0.0.0%2F24");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = creds(Some("tok"));
        let s = format!("{c:?}");
        assert!(!s.contains("wJalr") && !s.contains("tok\""), "{s}");
    }
}
