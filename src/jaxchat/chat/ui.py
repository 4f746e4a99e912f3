"""The chat page `jaxchat serve` answers at `/`: one HTML file, no external assets, kept as a string so it ships
inside the Python package. It keeps the conversation in the page and streams each reply from
`/v1/chat/completions` (server-sent events).
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>jaxchat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 0 auto; padding: 1rem; }
  #log { white-space: pre-wrap; }
  .user { background: #eef; padding: .5rem; border-radius: .4rem; margin: .5rem 0 .5rem 4rem; }
  .assistant { padding: .5rem; margin: .5rem 4rem .5rem 0; }
  .error { color: #b00; }
  form { display: flex; gap: .5rem; position: sticky; bottom: 0; background: #fff; padding: .5rem 0; }
  textarea { flex: 1; font: inherit; }
</style>
</head>
<body>
<h3>jaxchat</h3>
<div id="log"></div>
<form id="form">
  <textarea id="input" rows="2" placeholder="Message (Enter sends, Shift+Enter a new line)"></textarea>
  <label>temp <input id="temp" type="number" min="0" step="0.1" value="0.8" style="width:4rem"></label>
  <button>Send</button>
  <button type="button" id="clear">Clear</button>
</form>
<script>
// The conversation lives here, in the page: every request sends it whole (the endpoint is stateless).
let messages = [];
const log = document.getElementById("log"), input = document.getElementById("input");

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = role;
  div.textContent = text;
  log.appendChild(div);
  window.scrollTo(0, document.body.scrollHeight);
  return div;
}

async function send(text) {
  messages.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  const temperature = parseFloat(document.getElementById("temp").value);
  const res = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({messages, temperature, stream: true})});
  if (!res.ok) {
    out.className = "error";
    out.textContent = (await res.json()).error.message;
    messages.pop();
    return;
  }
  // server-sent events: lines "data: {chunk}" separated by blank lines, ending with "data: [DONE]"
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const delta = JSON.parse(data).choices[0].delta;
      if (delta.content) out.textContent += delta.content;
    }
  }
  if (out.textContent) messages.push({role: "assistant", content: out.textContent});
  else messages.pop();
}

document.getElementById("form").onsubmit = (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (text) { input.value = ""; send(text); }
};
input.onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("form").requestSubmit(); }
};
document.getElementById("clear").onclick = () => { messages = []; log.innerHTML = ""; };
</script>
</body>
</html>
"""
