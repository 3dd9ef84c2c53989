//! The sandbox's stand-in for Truora's identity page, `GET /?token=...`, and the form that ends
//! a process, `POST /sandbox/processes/finish`.
//!
//! The page shows the token's process (flow, account, process id, status) and, while it is
//! pending, an Approve and a Decline button; opening it the first time creates the process (its
//! webhook goes out). The finish form answers HTML to a browser (`Accept` with `text/html`) and
//! JSON to anyone else. Everything echoed into HTML is escaped.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json as value;

use super::processes::{ProcessInfo, SandboxError};
use super::webhook::Delivery;
use super::{json, whole, SandBody, Shared};

/// Where the finish form posts.
pub(super) const FINISH_PATH: &str = "/sandbox/processes/finish";
/// The largest finish form read (a token is at most 8 KiB).
const FORM_LIMIT: usize = 64 * 1024;

const HEAD: &str = "<!doctype html><meta charset=\"utf-8\"><title>Sandbox identity page</title>";

/// `GET /?token=...`.
pub(super) async fn identity_page(shared: &Shared, query: &str) -> Response<SandBody> {
    let token = form_urlencoded::parse(query.as_bytes())
        .find(|(k, v)| k == "token" && !v.is_empty())
        .map(|(_, v)| v.into_owned());
    let Some(token) = token else {
        return html(StatusCode::OK, format!("{HEAD}<p>No token given.</p>"));
    };
    match shared.open(&token).await {
        Ok((info, delivery)) => html(StatusCode::OK, process_page(&token, &info, delivery)),
        Err(_) => html(
            StatusCode::NOT_FOUND,
            format!(
                "{HEAD}<h1>Sandbox identity page</h1><p>Unknown token: this sandbox did not mint \
                 it (or has forgotten its process), so there is no process to show.</p>"
            ),
        ),
    }
}

fn process_page(token: &str, info: &ProcessInfo, created: Option<Delivery>) -> String {
    let mut page = format!(
        "{HEAD}<h1>Sandbox identity page</h1>\
         <p>This stands in for Truora's identity validation: a real token would start the \
         document, selfie or OTP steps here.</p>{}",
        facts(info)
    );
    if let Some(delivery) = created {
        page.push_str(&format!("<p>{}</p>", escape(&delivery_text(&delivery))));
    }
    if info.status == "pending" {
        for (outcome, label) in [("approve", "Approve"), ("decline", "Decline")] {
            page.push_str(&format!(
                "<form method=\"post\" action=\"{FINISH_PATH}\">\
                 <input type=\"hidden\" name=\"token\" value=\"{}\">\
                 <input type=\"hidden\" name=\"outcome\" value=\"{outcome}\">\
                 <button type=\"submit\">{label}</button></form>",
                escape(token)
            ));
        }
    } else {
        page.push_str("<p>This process is finished.</p>");
    }
    page
}

/// The process's facts, as an HTML list.
fn facts(info: &ProcessInfo) -> String {
    format!(
        "<dl><dt>Flow id</dt><dd>{}</dd><dt>Account id</dt><dd>{}</dd>\
         <dt>Process id</dt><dd>{}</dd><dt>Status</dt><dd>{}</dd></dl>",
        escape(&info.flow_id),
        escape(&info.account_id),
        escape(&info.process_id),
        escape(&info.status),
    )
}

/// `POST /sandbox/processes/finish`, form `token=...&outcome=approve|decline`.
pub(super) async fn finish(shared: &Shared, req: Request<Incoming>) -> Response<SandBody> {
    let wants_html = accepts_html(req.headers());
    let refuse = |status, message: &str| refusal(wants_html, status, message);
    let body = match Limited::new(req.into_body(), FORM_LIMIT).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "the form is unreadable or too large",
            )
        }
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };
    let Some(token) = field("token") else {
        return refuse(StatusCode::BAD_REQUEST, "missing field: token");
    };
    let approve = match field("outcome") {
        Some("approve") => true,
        Some("decline") => false,
        Some(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad field: outcome must be approve or decline",
            )
        }
        None => return refuse(StatusCode::BAD_REQUEST, "missing field: outcome"),
    };
    match shared.finish(token, approve).await {
        Ok((info, delivery)) => finished(wants_html, token, &info, delivery.as_ref()),
        Err(SandboxError::UnknownToken) => refuse(
            StatusCode::NOT_FOUND,
            "unknown token: this sandbox did not mint it",
        ),
        Err(SandboxError::AlreadyFinished) => {
            let status = shared
                .process_of(token)
                .map(|p| p.status)
                .unwrap_or_default();
            refuse(
                StatusCode::CONFLICT,
                &format!("the process is already finished ({status})"),
            )
        }
    }
}

/// The answer to a finish that ended the process.
fn finished(
    wants_html: bool,
    token: &str,
    info: &ProcessInfo,
    delivery: Option<&Delivery>,
) -> Response<SandBody> {
    if !wants_html {
        let webhook = match delivery {
            Some(Delivery {
                status: Some(status),
                ..
            }) => value!({ "status": status }),
            Some(Delivery {
                error: Some(error), ..
            }) => value!({ "error": error }),
            _ => serde_json::Value::Null,
        };
        return json(
            StatusCode::OK,
            value!({ "process_id": info.process_id, "status": info.status, "webhook": webhook })
                .to_string(),
        );
    }
    let webhook = match delivery {
        Some(delivery) => delivery_text(delivery),
        None => "No webhook target is configured: nothing was delivered.".to_owned(),
    };
    let back: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    html(
        StatusCode::OK,
        format!(
            "{HEAD}<h1>Process finished</h1>{}<p>{}</p><p><a href=\"/?token={}\">Back to the \
             identity page</a></p>",
            facts(info),
            escape(&webhook),
            escape(&back)
        ),
    )
}

/// A refused finish: `{"error": message}` or a page saying it.
fn refusal(wants_html: bool, status: StatusCode, message: &str) -> Response<SandBody> {
    if wants_html {
        html(
            status,
            format!("{HEAD}<h1>Not finished</h1><p>{}</p>", escape(message)),
        )
    } else {
        json(status, value!({ "error": message }).to_string())
    }
}

/// What came of a delivery, in a sentence.
fn delivery_text(delivery: &Delivery) -> String {
    match (&delivery.status, &delivery.error) {
        (Some(status), _) => format!(
            "Webhook {}: the receiver answered {status}.",
            delivery.event
        ),
        (None, Some(error)) => format!("Webhook {}: not delivered, {error}.", delivery.event),
        (None, None) => format!("Webhook {}: no answer.", delivery.event),
    }
}

/// Whether the request's `Accept` names `text/html` (a browser submitting the form).
fn accepts_html(headers: &HeaderMap) -> bool {
    headers.get_all(http::header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.to_ascii_lowercase().contains("text/html"))
    })
}

fn html(status: StatusCode, body: String) -> Response<SandBody> {
    let mut r = Response::new(whole(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// Text made safe inside HTML elements and quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;
    use http::Method;

    #[test]
    fn escape_covers_the_html_specials() {
        assert_eq!(
            escape(r#"<b a="1" c='2'>&</b>"#),
            "&lt;b a=&quot;1&quot; c=&#39;2&#39;&gt;&amp;&lt;/b&gt;"
        );
    }

    async fn page(sandbox: &crate::sandbox::Sandbox, token: &str) -> Answer {
        let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
        send(
            Method::GET,
            &format!("{}/?token={token}", sandbox.url()),
            &[],
            "",
        )
        .await
    }

    #[tokio::test]
    async fn opening_the_page_twice_delivers_created_once() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(Some(b"s"))));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let info = sandbox.process_of(&token).unwrap();

        let first = page(&sandbox, &token).await;
        assert_eq!(first.status, StatusCode::OK);
        let text = first.text();
        for shown in ["IPFflow1", "user-1", info.process_id.as_str(), "pending"] {
            assert!(text.contains(shown), "{shown} in {text}");
        }
        assert_eq!(
            text.matches(r#"action="/sandbox/processes/finish""#)
                .count(),
            2
        );
        assert!(text.contains(r#"name="outcome" value="approve""#));
        assert!(text.contains(r#"name="outcome" value="decline""#));
        assert!(text.contains(&format!(r#"name="token" value="{token}""#)));
        assert_eq!(page(&sandbox, &token).await.status, StatusCode::OK);

        let hooks = receiver.requests();
        assert_eq!(hooks.len(), 1);
        let claims = verified_claims(&hooks[0].body, b"s");
        assert_eq!(claims["event"], "identity_process_created");
        assert_eq!(claims["process_id"], info.process_id.as_str());
        // Created is not an end: the process is still pending.
        assert_eq!(sandbox.process_of(&token).unwrap().status, "pending");
    }

    #[tokio::test]
    async fn an_unknown_or_forged_token_gets_a_404_page_and_delivers_nothing() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(None)));
        let forged = crate::sandbox::sign_hs256(b"other key", r#"{"jti":"x"}"#);
        for bad in [forged.as_str(), "nonsense"] {
            let answer = page(&sandbox, bad).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND);
            assert!(answer.text().contains("Unknown token"));
            let finish = finish_form(&sandbox, bad, "approve", "application/json").await;
            assert_eq!(finish.status, StatusCode::NOT_FOUND);
            assert!(finish.json()["error"].as_str().unwrap().contains("unknown"));
        }
        assert!(receiver.requests().is_empty());
        assert!(sandbox.deliveries().is_empty());
    }

    #[tokio::test]
    async fn no_token_keeps_the_no_token_page() {
        let sandbox = start().await;
        for url in [
            format!("{}/", sandbox.url()),
            format!("{}/?token=", sandbox.url()),
        ] {
            let answer = send(Method::GET, &url, &[], "").await;
            assert_eq!(answer.status, StatusCode::OK);
            assert!(answer.text().contains("No token given."));
        }
    }

    #[tokio::test]
    async fn an_account_id_is_escaped_in_the_page() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("<b>")).await;
        let text = page(&sandbox, &token).await.text();
        assert!(text.contains("&lt;b&gt;"), "{text}");
        assert!(!text.contains("<b>"), "{text}");
    }

    #[tokio::test]
    async fn finishing_twice_is_409_with_no_second_delivery() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(None)));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let first = finish_form(&sandbox, &token, "approve", "application/json").await;
        assert_eq!(first.status, StatusCode::OK);
        let again = finish_form(&sandbox, &token, "decline", "application/json").await;
        assert_eq!(again.status, StatusCode::CONFLICT);
        assert!(again.json()["error"]
            .as_str()
            .unwrap()
            .contains("already finished"));
        let html_again = finish_form(&sandbox, &token, "approve", "text/html").await;
        assert_eq!(html_again.status, StatusCode::CONFLICT);
        assert!(html_again.text().contains("already finished"));
        assert_eq!(receiver.requests().len(), 1);
        assert_eq!(sandbox.process_of(&token).unwrap().status, "success");
        // The page no longer offers the buttons.
        let text = page(&sandbox, &token).await.text();
        assert!(!text.contains("outcome"), "{text}");
        assert!(text.contains("success"));
    }

    #[tokio::test]
    async fn a_browser_gets_a_page_with_the_facts_and_a_link_back() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let answer = finish_form(
            &sandbox,
            &token,
            "decline",
            "text/html,application/xhtml+xml,*/*;q=0.8",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.headers[http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let text = answer.text();
        assert!(text.contains("failure"), "{text}");
        assert!(text.contains("No webhook target"), "{text}");
        assert!(
            text.contains(&format!("href=\"/?token={token}\"")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn without_a_target_the_json_answer_has_webhook_null() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let answer = finish_form(&sandbox, &token, "approve", "application/json").await;
        let body = answer.json();
        assert_eq!(body["status"], "success");
        assert_eq!(body["webhook"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn a_bad_outcome_or_a_missing_field_is_400_naming_it() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let url = format!("{}{FINISH_PATH}", sandbox.url());
        let token_field: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
        for (form, named) in [
            ("outcome=approve".to_owned(), "token"),
            (format!("token={token_field}"), "outcome"),
            (format!("token={token_field}&outcome=maybe"), "outcome"),
            ("%ff%fe=&&&".to_owned(), "token"),
        ] {
            let answer = send(Method::POST, &url, &[], &form).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{form}");
            let error = answer.json()["error"].as_str().unwrap().to_owned();
            assert!(error.contains(named), "{form}: {error}");
        }
        assert_eq!(sandbox.process_of(&token).unwrap().status, "pending");
    }
}
