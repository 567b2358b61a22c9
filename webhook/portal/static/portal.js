// The developer portal's few behaviours; every page works without them but these.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Copy buttons: the text of the element named by data-copy.
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      try {
        await navigator.clipboard.writeText(source.textContent);
        button.textContent = "Copied";
      } catch {
        window.getSelection().selectAllChildren(source);  // copy by hand
        button.textContent = "Press Ctrl+C";
      }
    });
  }
  // A sign-in link's token travels in the fragment, which no server sees; it
  // goes into the form and leaves the address bar (and the history).
  const token = document.getElementById("link-token");
  if (token) {
    token.value = new URLSearchParams(location.hash.slice(1)).get("token") || "";
    history.replaceState(null, "", location.pathname);
  }
  // Revoking cannot be undone: ask first.
  for (const form of document.querySelectorAll("form.confirm")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm("Revoke this key? Requests using it stop within a second.")) {
        event.preventDefault();
      }
    });
  }
  // The grace period's countdown, live.
  for (const el of document.querySelectorAll(".countdown[data-until]")) {
    const until = Number(el.dataset.until) * 1000;
    const tick = () => {
      const left = Math.max(0, until - Date.now()) / 1000;
      const d = Math.floor(left / 86400), h = Math.floor((left % 86400) / 3600);
      const m = Math.floor((left % 3600) / 60);
      el.textContent = `${d} d ${h} h ${m} min`;
    };
    tick();
    setInterval(tick, 30000);
  }
});
