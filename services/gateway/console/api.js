// The REST API as the console calls it: the key and the user (or a bearer token) on every call, the ESD envelope
// unwrapped, Server-Sent Events read with fetch (EventSource cannot send the key), and uploads
// to presigned URLs with progress.

const SESSION = "esd.console";

export class ApiError extends Error {}

export function signedIn() {
  const stored = sessionStorage.getItem(SESSION);
  return stored ? JSON.parse(stored) : null;
}

export function signIn(apiKey, user, token = "") {
  sessionStorage.setItem(SESSION, JSON.stringify({ apiKey, user, token }));
}

// Trades the password for a bearer token (POST /tokens), kept instead of the password.
export async function signInWithPassword(apiKey, user, password) {
  signIn(apiKey, user);
  const issued = await call("POST", "/tokens", { username: user, password });
  signIn(apiKey, issued.username, issued.token);
}

export async function signOut() {
  const who = signedIn();
  if (who && who.token) await call("DELETE", "/tokens").catch(() => {}); // revoke it
  sessionStorage.removeItem(SESSION);
}

function headers(extra = {}) {
  const who = signedIn() || {};
  const sent = { "x-api-key": who.apiKey || "", username: who.user || "", ...extra };
  if (who.token) sent.authorization = `Bearer ${who.token}`;
  return sent;
}

export async function call(method, path, body) {
  const options = { method, headers: headers() };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["content-type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(`the gateway does not answer: ${error.message}`);
  }
  if (response.status === 204) return {};
  const reply = await response.json().catch(() => ({}));
  if (!response.ok) {
    let message = reply.message || response.statusText;
    if (response.status === 403 && message === "Forbidden") message = "Forbidden: the API key is wrong";
    throw new ApiError(`${message} (HTTP ${response.status})`);
  }
  return reply.data || {};
}

// Calls onEvent({id, type, data}) for each event of the stream until it ends, onEvent returns
// true, or `signal` aborts.
export async function follow(path, onEvent, signal) {
  const response = await fetch(path, { headers: headers({ accept: "text/event-stream" }), signal });
  if (!response.ok) {
    const reply = await response.json().catch(() => ({}));
    throw new ApiError(`${reply.message || response.statusText} (HTTP ${response.status})`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let fields = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (fields.data !== undefined) {
          const event = { id: Number(fields.id), type: fields.event || "message", data: JSON.parse(fields.data) };
          if (onEvent(event)) {
            reader.cancel();
            return;
          }
        }
        fields = {};
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        fields[line.slice(0, colon)] = line.slice(colon + 1).replace(/^ /, "");
      }
    }
  }
}

// PUTs a blob to a presigned URL; onProgress(bytes sent so far). Resolves to the ETag.
export function put(url, blob, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("PUT", url);
    request.upload.onprogress = (event) => onProgress(event.loaded);
    request.onload = () => {
      if (request.status === 200) resolve(request.getResponseHeader("ETag"));
      else reject(new ApiError(`storage refused a part (HTTP ${request.status})`));
    };
    request.onerror = () => reject(new ApiError("storage could not be reached"));
    request.send(blob);
  });
}
