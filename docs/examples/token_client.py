"""A Python service asking token-broker for a Web Integration Token, and sending its user to
Truora's identity page. Standard library only (Python 3.8+).

    TOKEN_BROKER_URL=http://token-broker:8080 TOKEN_BROKER_SECRET=... python3 token_client.py

The caller secret stays on the back end: only the token, inside `identity_url` or the form
below, ever reaches the user's browser.
"""

import html
import json
import os
import urllib.error
import urllib.parse
import urllib.request

IDENTITY_PAGE = "https://identity.truora.com/"


class BrokerError(Exception):
    """The broker refused or failed; `code` is its stable error code, `retry_after` in seconds."""

    def __init__(self, status, code, message, retry_after=None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.retry_after = status, code, retry_after


def get_token(broker_url, secret, *, country, flow_id, redirect_url, account_id, timeout=10):
    """The broker's answer: api_key, identity_url, expires_at, expires_in, cache."""
    body = urllib.parse.urlencode({
        "country": country,
        "flow_id": flow_id,
        "redirect_url": redirect_url,
        "account_id": account_id,
    }).encode()
    request = urllib.request.Request(
        broker_url.rstrip("/") + "/v1/tokens",
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {secret}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        error = json.load(e)
        retry_after = e.headers.get("Retry-After")
        raise BrokerError(e.code, error["error"], error["message"],
                          int(retry_after) if retry_after else None) from None


def redirect_to_identity_page(answer):
    """The GET way: an HTTP redirect of the user's browser to identity_url."""
    return 303, {"Location": answer["identity_url"], "Cache-Control": "no-store"}


def identity_form(api_key, action=IDENTITY_PAGE):
    """The POST way, which keeps the token out of the address bar: a page whose form posts one
    hidden input named `token` to Truora's identity page (submitted at once by the script)."""
    return f"""<!doctype html>
<html>
<body onload="document.forms[0].submit()">
<form method="POST" action="{html.escape(action)}">
  <input type="hidden" name="token" value="{html.escape(api_key)}">
  <noscript><button type="submit">Continue to identity verification</button></noscript>
</form>
</body>
</html>
"""


if __name__ == "__main__":
    answer = get_token(
        os.environ.get("TOKEN_BROKER_URL", "http://127.0.0.1:8080"),
        os.environ["TOKEN_BROKER_SECRET"],
        country="CO",
        flow_id="IPF0123456789abcdef",
        redirect_url="https://example.com/done",
        account_id="example-user-1",
    )
    status, headers = redirect_to_identity_page(answer)
    # The token is for the user's browser; logs get only what an operator needs.
    print(json.dumps({"cache": answer["cache"], "expires_in": answer["expires_in"], "redirect": status}))
