//! The purchase request: one `POST` with the command's id as Idempotency-Key.
//!
//! The client never retries by itself (reqwest's built-in retry has no backoff
//! and ignores `Retry-After`); it reports one attempt, and the pipeline decides.

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use time::OffsetDateTime;

use super::answer::{FinalAnswer, PurchaseAnswer, Quota, TransientCause, classify};
use crate::configuration::{ApiKey, HyperlineSettings};
use crate::contract::{Command, CustomerId, Pricing, ProductId};

/// Why a client could not be built. Never carries the key.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key has characters an HTTP header cannot carry.
    #[error("the Hyperline API key contains characters not allowed in an HTTP header")]
    InvalidKey,
    /// reqwest refused the settings (TLS backend, ...).
    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// One attempt's answer plus the rate-limit quota the answer announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurchaseResponse {
    /// What to do next.
    pub answer: PurchaseAnswer,
    /// The HTTP status, when an answer arrived.
    pub status: Option<u16>,
    /// The write budget left, when the headers said.
    pub quota: Option<Quota>,
}

/// What a credential probe learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// The key passed authentication.
    Accepted,
    /// 401 or 403.
    Refused(u16),
    /// No verdict (timeout, 5xx, ...).
    Unknown(String),
}

/// Customer and product of the probe request: valid ids that name nothing.
const PROBE_ID: &str = "cpw_credential_probe";

/// Header names, lower case and built at compile time: a name parsed from
/// `"Idempotency-Key"` would be lower-cased into a fresh allocation on
/// every request.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

impl PurchaseResponse {
    /// The metrics label of the answer: its status class, or what kept it
    /// from arriving.
    pub fn status_class(&self) -> &'static str {
        match (self.status, &self.answer) {
            (Some(429), _) => "429",
            (Some(200..=299), _) => "2xx",
            (Some(400..=499), _) => "4xx",
            (Some(500..=599), _) => "5xx",
            (Some(_), _) => "other",
            (None, PurchaseAnswer::Transient { cause, .. }) => cause.label(),
            (None, _) => "error",
        }
    }

    /// Hyperline answered before processing the purchase: the key was
    /// refused (401, 403) or the rate limit reached (429).
    fn turned_away(&self) -> bool {
        matches!(self.status, Some(401 | 403 | 429))
    }

    /// Whether the request may have charged: anything but an answer given
    /// before the purchase is processed or a request that never left (a
    /// connect failure). Such a request starts the command's idempotency
    /// window.
    pub fn may_have_charged(&self) -> bool {
        let never_left = matches!(
            (self.status, &self.answer),
            (
                None,
                PurchaseAnswer::Transient {
                    cause: TransientCause::Connect,
                    ..
                }
            )
        );
        !(self.turned_away() || never_left)
    }

    /// Whether the answer proves the key: any answer but a refusal before
    /// processing (a 429 comes before authentication is known to pass).
    pub fn proves_key(&self) -> bool {
        self.status.is_some() && !self.turned_away()
    }

    /// Whether the answer speaks for the API itself, so that its lack of
    /// rate-limit headers says the API announces none: not a gateway's 5xx,
    /// nor a refusal before processing.
    pub fn speaks_for_the_api(&self) -> bool {
        matches!(self.status, Some(200..=499)) && !self.turned_away()
    }
}

/// The JSON body of the purchase request.
#[derive(Serialize)]
struct PurchaseBody<'a> {
    credit_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount_excluding_tax: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<&'a str>,
}

/// The path of the purchase endpoint. The ids are valid by construction, so
/// nothing in them can change the URL.
pub fn purchase_path(customer: &CustomerId, product: &ProductId) -> String {
    let mut path = String::new();
    push_purchase_path(&mut path, customer, product);
    path
}

/// The constant part of [`purchase_path`]'s length.
const PATH_TEMPLATE_LEN: usize = "/v1/customers//credits//purchase".len();

/// Appends [`purchase_path`] to `out` (no formatting machinery: it runs for
/// every request).
fn push_purchase_path(out: &mut String, customer: &CustomerId, product: &ProductId) {
    let (customer, product) = (customer.as_str(), product.as_str());
    out.reserve(PATH_TEMPLATE_LEN + customer.len() + product.len());
    out.push_str("/v1/customers/");
    out.push_str(customer);
    out.push_str("/credits/");
    out.push_str(product);
    out.push_str("/purchase");
}

/// The request's URL on the attempt's client span (when the current span is
/// one), without the user and password a `base_url` could carry.
fn record_url(span: &tracing::Span, url: &reqwest::Url) {
    if !span.has_field("url.full") {
        return;
    }
    let mut shown = url.clone();
    // Fails only for URLs that cannot have credentials, which have none.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    span.record("url.full", shown.as_str());
    if let Some(host) = url.host_str() {
        span.record("server.address", host);
    }
    if let Some(port) = url.port_or_known_default() {
        span.record("server.port", port);
    }
}

/// A Hyperline API client for purchases. Cheap to clone; share one per process
/// so connections are pooled.
#[derive(Clone)]
pub struct HyperlineClient {
    http: reqwest::Client,
    /// `base_url`, parsed once: a URL parsed from text for every request
    /// would run the host through IDNA processing each time.
    base: reqwest::Url,
    /// Its path without a trailing slash.
    base_path: String,
    /// `Bearer <key>`, marked sensitive so no debug output shows it.
    authorization: HeaderValue,
    /// The key, to scrub it from any text that came back from the network.
    key: ApiKey,
}

impl std::fmt::Debug for HyperlineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperlineClient")
            .field("base", &self.base.as_str())
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl HyperlineClient {
    /// Builds a client with separate connect and total deadlines.
    pub fn new(settings: &HyperlineSettings, key: ApiKey) -> Result<Self, ClientError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| ClientError::InvalidKey)?;
        authorization.set_sensitive(true);
        let mut default_headers = HeaderMap::new();
        default_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &settings.ca_file {
            let certs = reqwest::Certificate::from_pem_bundle(pem.text().as_bytes())
                .map_err(ClientError::Build)?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .connect_timeout(settings.connect_timeout())
            .timeout(settings.timeout())
            // reqwest follows up to 10 redirects by default: a 307/308 would
            // re-send the purchase, key and body to wherever `Location`
            // points, a 301/302/303 would turn it into a GET. A redirect is
            // an undocumented answer (`unexpected_response`), never a hop.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .user_agent(concat!(
                "credit-purchase-worker/",
                env!("CARGO_PKG_VERSION")
            ))
            .default_headers(default_headers)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base: settings.base_url.clone(),
            base_path: settings.base_url.path().trim_end_matches('/').to_owned(),
            authorization,
            key,
        })
    }

    /// The request body of a command. Deterministic, so every attempt of a
    /// command sends the same bytes (Hyperline answers 417 otherwise).
    pub fn body(command: &Command) -> Vec<u8> {
        let (amount, price) = match &command.pricing {
            Pricing::Amount(a) => (Some(*a), None),
            Pricing::PriceId(p) => (None, Some(p.as_str())),
        };
        let body = PurchaseBody {
            credit_count: command.credit_count.get(),
            amount_excluding_tax: amount,
            price_id: price,
            expires_at: command.expires_at.as_deref(),
        };
        // Integers and strings only: serialisation cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// One purchase attempt. Never fails: every outcome, network errors
    /// included, is an answer.
    pub async fn purchase(&self, command: &Command, traceparent: Option<&str>) -> PurchaseResponse {
        let url = self.purchase_url(&command.customer_id, &command.product_id);
        record_url(&tracing::Span::current(), &url);
        let mut request = self
            .http
            .post(url)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(IDEMPOTENCY_KEY, command.id.as_str())
            .body(Self::body(command));
        if let Some(tp) = traceparent.and_then(|tp| HeaderValue::from_str(tp).ok()) {
            request = request.header(TRACEPARENT, tp);
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => return self.network_failure(&e),
        };
        let status = response.status().as_u16();
        // Taken, not cloned: reading the body does not need them.
        let headers = std::mem::take(response.headers_mut());
        // Boxed: the body-reading state is the bulk of this future, and it is
        // needed only once the answer is in; a request still waiting for its
        // answer (most of them, against a slow API) then holds far less.
        match Box::pin(response.bytes()).await {
            Ok(body) => {
                let (answer, quota) = classify(status, &headers, &body, OffsetDateTime::now_utc());
                PurchaseResponse {
                    answer: self.scrub(answer),
                    status: Some(status),
                    quota,
                }
            }
            // Headers arrived but the body did not: for a 2xx the purchase
            // happened; retrying with the same key replays it.
            Err(e) => self.network_failure(&e),
        }
    }

    /// Tests the key without buying anything: a purchase request with an
    /// empty body and no Idempotency-Key. Authentication comes before
    /// validation, so a 401/403 means the key is refused and any 4xx
    /// validation answer means it passed; an empty body can never charge.
    pub async fn probe_credentials(&self) -> ProbeResult {
        let id = CustomerId::parse(PROBE_ID).ok();
        let product = ProductId::parse(PROBE_ID).ok();
        let (Some(id), Some(product)) = (id, product) else {
            return ProbeResult::Unknown("probe ids are invalid".into());
        };
        let sent = self
            .http
            .post(self.purchase_url(&id, &product))
            .header(AUTHORIZATION, self.authorization.clone())
            .body("{}")
            .send()
            .await;
        match sent.map(|r| r.status().as_u16()) {
            Ok(status @ (401 | 403)) => ProbeResult::Refused(status),
            Ok(429) => ProbeResult::Unknown("HTTP 429".into()),
            Ok(400..=499) => ProbeResult::Accepted,
            Ok(status) => ProbeResult::Unknown(format!("HTTP {status}")),
            Err(e) => ProbeResult::Unknown(self.redact(&error_chain(&e))),
        }
    }

    /// A `GET` of `path` (after `base_url`'s own path) with `query`,
    /// authorised like every request of this client and bound by the same
    /// deadlines.
    pub(super) fn get(&self, path: &str, query: &[(&str, u64)]) -> reqwest::RequestBuilder {
        let mut url = self.base.clone();
        url.set_path(&format!("{}{path}", self.base_path));
        url.query_pairs_mut()
            .clear()
            .extend_pairs(query.iter().map(|(k, v)| (k, v.to_string())));
        self.http
            .get(url)
            .header(AUTHORIZATION, self.authorization.clone())
    }

    /// `base_url` + [`purchase_path`]: the parsed base with the path set.
    fn purchase_url(&self, customer: &CustomerId, product: &ProductId) -> reqwest::Url {
        let mut path = String::with_capacity(
            self.base_path.len()
                + PATH_TEMPLATE_LEN
                + customer.as_str().len()
                + product.as_str().len(),
        );
        path.push_str(&self.base_path);
        push_purchase_path(&mut path, customer, product);
        let mut url = self.base.clone();
        url.set_path(&path);
        url
    }

    fn network_failure(&self, e: &reqwest::Error) -> PurchaseResponse {
        let cause = if e.is_timeout() {
            TransientCause::Timeout
        } else if e.is_connect() {
            TransientCause::Connect
        } else {
            TransientCause::Network(self.redact(&error_chain(e)))
        };
        PurchaseResponse {
            answer: PurchaseAnswer::Transient {
                status: None,
                cause,
            },
            status: None,
            quota: None,
        }
    }

    /// Texts from the network go into events and logs: make sure the key is
    /// not among them, even if a server echoes it.
    pub(super) fn redact(&self, text: &str) -> String {
        redact_key(text, self.key.expose())
    }

    fn scrub(&self, answer: PurchaseAnswer) -> PurchaseAnswer {
        let PurchaseAnswer::Final(answer) = answer else {
            return answer;
        };
        PurchaseAnswer::Final(match answer {
            FinalAnswer::Rejected { status, message } => FinalAnswer::Rejected {
                status,
                message: self.redact(&message),
            },
            FinalAnswer::IdempotencyConflict { message } => FinalAnswer::IdempotencyConflict {
                message: self.redact(&message),
            },
            FinalAnswer::UnexpectedResponse { status, detail } => FinalAnswer::UnexpectedResponse {
                status,
                detail: self.redact(&detail),
            },
            succeeded @ FinalAnswer::Succeeded(_) => succeeded,
        })
    }
}

/// `text` with `key` replaced. A key as long as a real one is replaced
/// wherever it appears: no unrelated text contains it by chance. A shorter
/// one (a test key, a mistake) only where it stands whole, not inside a
/// longer run of key characters: it would otherwise cut unrelated words that
/// merely contain it (`https://sandbo[REDACTED].api…`), while a key echoed
/// by a server stands apart (quoted, after `Bearer `, in a URL).
fn redact_key(text: &str, key: &str) -> String {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if key.is_empty() || !text.contains(key) {
        return text.to_owned();
    }
    if key.len() >= REAL_KEY_LEN {
        return text.replace(key, "[REDACTED]");
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    for (at, _) in text.match_indices(key) {
        if at < rest {
            continue;
        }
        let end = at + key.len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        let whole = !before.is_some_and(is_key_char) && !after.is_some_and(is_key_char);
        if whole {
            out.push_str(&text[rest..at]);
            out.push_str("[REDACTED]");
            rest = end;
        }
    }
    out.push_str(&text[rest..]);
    out
}

/// The length from which a key is taken for a real one (Hyperline's keys
/// are far longer).
const REAL_KEY_LEN: usize = 16;

/// An error with all its causes, as one line.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::redact_key;

    #[test]
    fn a_short_key_is_redacted_only_where_it_stands_whole() {
        let text = "https://sandbox.api.hyperline.co: key x echoed: \"x\", Bearer x";
        assert_eq!(
            redact_key(text, "x"),
            "https://sandbox.api.hyperline.co: key [REDACTED] echoed: \"[REDACTED]\", Bearer [REDACTED]"
        );
        assert_eq!(redact_key("sandbox", "sand"), "sandbox");
    }

    #[test]
    fn a_real_key_is_redacted_wherever_it_appears() {
        let key = "sk_live_0123456789abcdef";
        let text = format!("prefix{key}suffix and {key}");
        assert_eq!(
            redact_key(&text, key),
            "prefix[REDACTED]suffix and [REDACTED]"
        );
    }
}
