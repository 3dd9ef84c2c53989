// A Node service asking token-broker for a Web Integration Token, and sending its user to
// Truora's identity page. No dependencies (Node 18+: fetch is built in).
//
//   TOKEN_BROKER_URL=http://token-broker:8080 TOKEN_BROKER_SECRET=... node token-client.mjs
//
// The caller secret stays on the back end: only the token, inside identity_url or the form
// below, ever reaches the user's browser.

export class BrokerError extends Error {
  constructor(status, code, message, retryAfter) {
    super(`${status} ${code}: ${message}`);
    Object.assign(this, { status, code, retryAfter });
  }
}

/** The broker's answer: api_key, identity_url, expires_at, expires_in, cache. */
export async function getToken(brokerUrl, secret, { country, flowId, redirectUrl, accountId }) {
  const response = await fetch(`${brokerUrl.replace(/\/$/, "")}/v1/tokens`, {
    method: "POST",
    headers: { Authorization: `Bearer ${secret}`, "Content-Type": "application/json" },
    body: JSON.stringify({
      country,
      flow_id: flowId,
      redirect_url: redirectUrl,
      account_id: accountId,
    }),
    signal: AbortSignal.timeout(10_000),
  });
  const body = await response.json();
  if (!response.ok) {
    const retryAfter = response.headers.get("retry-after");
    throw new BrokerError(response.status, body.error, body.message, retryAfter && Number(retryAfter));
  }
  return body;
}

/** The GET way, in a node:http (or Express) handler: redirect the browser to identity_url. */
export function redirectToIdentityPage(res, answer) {
  res.writeHead(303, { Location: answer.identity_url, "Cache-Control": "no-store" });
  res.end();
}

const escape = (s) =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

/** The POST way: a page whose form posts the hidden input `token` to Truora's identity page. */
export function identityForm(apiKey, action = "https://identity.truora.com/") {
  return `<!doctype html>
<html>
<body onload="document.forms[0].submit()">
<form method="POST" action="${escape(action)}">
  <input type="hidden" name="token" value="${escape(apiKey)}">
  <noscript><button type="submit">Continue to identity verification</button></noscript>
</form>
</body>
</html>
`;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const answer = await getToken(process.env.TOKEN_BROKER_URL ?? "http://127.0.0.1:8080", process.env.TOKEN_BROKER_SECRET, {
    country: "CO",
    flowId: "IPF0123456789abcdef",
    redirectUrl: "https://example.com/done",
    accountId: "example-user-1",
  });
  // The token is for the user's browser; logs get only what an operator needs.
  console.log(JSON.stringify({ cache: answer.cache, expires_in: answer.expires_in }));
}
