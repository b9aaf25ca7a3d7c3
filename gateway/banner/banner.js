/*
 * privacy-gateway consent banner: progressive enhancement of a plain HTML form.
 *
 * Without this script everything still works: the banner is a <form method="post"> to {prefix}/consent, and the
 * "Privacy settings" link opens the standalone page {prefix}/settings. With it:
 *   - a choice is sent as fetch POST {prefix}/consent {"categories": {...}} (JSON, same-origin) and the banner
 *     closes without a reload; any failure falls back to the normal form post, so a choice is never lost;
 *   - "Privacy settings" opens the settings panel in place (fetched from {prefix}/settings, which renders the
 *     visitor's current choices server-side: the consent cookie is HttpOnly and never read here);
 *   - Escape closes the disclosure or a reopened panel. It is never a choice: the first banner stays until the
 *     visitor answers;
 *   - after a saved choice, a "privacy-gateway:consent" event with {detail: {categories}} fires on document.
 * Loaded with <script defer src> only; no inline code or handlers, so a strict Content-Security-Policy works.
 */
(function () {
  "use strict";

  var doc = document;
  var html = doc.documentElement;
  if (!html || html.hasAttribute("data-pg-ready") || !doc.querySelector || !window.fetch) {
    return; // loaded twice, or a browser too old for the enhanced path: the plain form keeps working
  }
  html.setAttribute("data-pg-ready", "");

  var PANEL = "[data-pg-banner]:not([data-pg-standalone])";
  var lastAction = ""; // browsers without SubmitEvent.submitter
  var opener = null; // the element that opened a reopened panel, to give focus back

  function root() {
    return doc.querySelector("[data-pg-root]");
  }

  function closest(node, selector) {
    while (node && node.nodeType !== 1) {
      node = node.parentNode;
    }
    return node && node.closest ? node.closest(selector) : null;
  }

  function announce(text) {
    var r = root();
    var status = r && r.querySelector("[data-pg-status]");
    if (!status || !text) {
      return;
    }
    // Clear first so that the same message twice is announced twice by screen readers.
    status.textContent = "";
    window.setTimeout(function () {
      status.textContent = text;
    }, 100);
  }

  function categoriesFor(form, action) {
    var result = {};
    var boxes = form.querySelectorAll('input[type="checkbox"][name="category"]');
    for (var i = 0; i < boxes.length; i++) {
      var box = boxes[i];
      result[box.value] = action === "accept_all" ? true : action === "reject_all" ? false : box.checked;
    }
    return result;
  }

  function nativeSubmit(form, action) {
    var input = doc.createElement("input");
    input.type = "hidden";
    input.name = "action";
    input.value = action;
    form.appendChild(input);
    // HTMLFormElement.submit() fires no submit event, so this does not loop back into onSubmit.
    HTMLFormElement.prototype.submit.call(form);
  }

  function focusTarget() {
    if (opener && doc.contains(opener)) {
      return opener;
    }
    var r = root();
    return r && r.querySelector("[data-pg-open]");
  }

  function closePanel(panel) {
    var hadFocus = panel.contains(doc.activeElement);
    if (panel.parentNode) {
      panel.parentNode.removeChild(panel);
    }
    var target = focusTarget();
    opener = null;
    if (hadFocus && target) {
      target.focus();
    }
  }

  function focusPanel(panel) {
    // Focusing a control inside the dialog makes screen readers announce its name and description first.
    var first = panel.querySelector('input[type="checkbox"]') || panel.querySelector("button, summary, a[href]");
    if (first) {
      first.focus();
    }
  }

  function onSubmit(event) {
    var form = event.target;
    var panel = closest(form, "[data-pg-banner]");
    if (!panel || panel.hasAttribute("data-pg-standalone")) {
      return; // the standalone page posts normally and is redirected back (303)
    }
    var submitter = event.submitter;
    var action = submitter && submitter.name === "action" ? submitter.value : lastAction || "save";
    event.preventDefault();
    if (panel.getAttribute("aria-busy") === "true") {
      return;
    }
    panel.setAttribute("aria-busy", "true");
    var categories = categoriesFor(form, action);
    window
      .fetch(form.getAttribute("action"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ categories: categories }),
      })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("consent endpoint answered " + response.status);
        }
        closePanel(panel);
        var r = root();
        announce(r && r.getAttribute("data-pg-saved"));
        // Lets the site's own scripts react without a reload, e.g. document.addEventListener(
        // "privacy-gateway:consent", function (e) { if (e.detail.categories.analytics) { ... } }).
        doc.dispatchEvent(new CustomEvent("privacy-gateway:consent", { detail: { categories: categories } }));
      })
      .catch(function () {
        panel.removeAttribute("aria-busy");
        nativeSubmit(form, action);
      });
  }

  function adoptPanel(panel) {
    panel.removeAttribute("data-pg-standalone");
    panel.classList.remove("pg-banner-page");
    panel.setAttribute("role", "dialog");
    panel.setAttribute("aria-modal", "false");
    panel.setAttribute("data-pg-reopened", "");
    var heading = panel.querySelector("h1");
    if (heading) {
      // Inside someone else's page the panel is a section, not the page's main heading.
      var h2 = doc.createElement("h2");
      for (var i = 0; i < heading.attributes.length; i++) {
        h2.setAttribute(heading.attributes[i].name, heading.attributes[i].value);
      }
      while (heading.firstChild) {
        h2.appendChild(heading.firstChild);
      }
      heading.parentNode.replaceChild(h2, heading);
    }
    var close = panel.querySelector("[data-pg-close]");
    if (close) {
      close.hidden = false;
    }
    return panel;
  }

  function settingsUrl(trigger) {
    var href = trigger.getAttribute("href");
    if (href) {
      return href;
    }
    var link = root() && root().querySelector("a[data-pg-open]");
    return link ? link.getAttribute("href") : null;
  }

  function openPanel(trigger) {
    opener = trigger;
    var existing = doc.querySelector(PANEL);
    if (existing) {
      existing.hidden = false;
      var details = existing.querySelector("details");
      if (details) {
        details.open = true;
      }
      focusPanel(existing);
      return Promise.resolve();
    }
    var url = settingsUrl(trigger);
    if (!url) {
      return Promise.reject(new Error("no settings URL"));
    }
    return window
      .fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("settings page answered " + response.status);
        }
        return response.text();
      })
      .then(function (text) {
        // DOMParser documents run no scripts; the markup comes from our own same-origin endpoint.
        var parsed = new DOMParser().parseFromString(text, "text/html");
        var panel = parsed.querySelector("[data-pg-banner]");
        if (!panel) {
          throw new Error("settings page without a panel");
        }
        panel = adoptPanel(doc.importNode(panel, true));
        doc.body.insertBefore(panel, doc.body.firstChild);
        focusPanel(panel);
      });
  }

  function onClick(event) {
    var trigger = closest(event.target, "[data-pg-open]");
    if (trigger) {
      if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) {
        return; // let "open in new tab" and friends do what the visitor asked
      }
      event.preventDefault();
      openPanel(trigger).catch(function () {
        var url = settingsUrl(trigger);
        if (url) {
          window.location.assign(url);
        }
      });
      return;
    }
    var close = closest(event.target, "[data-pg-close]");
    if (close) {
      var panel = closest(close, "[data-pg-banner]");
      if (panel && panel.hasAttribute("data-pg-reopened")) {
        closePanel(panel);
      }
      return;
    }
    var button = closest(event.target, 'button[name="action"]');
    if (button) {
      lastAction = button.value;
    }
  }

  function onKeydown(event) {
    if (event.key !== "Escape" && event.key !== "Esc") {
      return;
    }
    var panel = doc.querySelector(PANEL);
    if (!panel || panel.hidden) {
      return;
    }
    var details = panel.querySelector("details[open]");
    if (details && details.contains(doc.activeElement)) {
      details.open = false;
      var summary = details.querySelector("summary");
      if (summary) {
        summary.focus();
      }
      event.preventDefault();
      return;
    }
    // Escape is not a choice: only a panel reopened after a choice was made closes; the first banner stays.
    if (panel.hasAttribute("data-pg-reopened")) {
      event.preventDefault();
      closePanel(panel);
    }
  }

  function init() {
    var banner = doc.querySelector(PANEL);
    if (banner && doc.body && doc.body.firstChild !== banner) {
      // Injected before </body>; reading order should put the question before the page, not after the footer.
      doc.body.insertBefore(banner, doc.body.firstChild);
    }
    var openers = doc.querySelectorAll("[data-pg-open]");
    for (var i = 0; i < openers.length; i++) {
      openers[i].setAttribute("aria-haspopup", "dialog");
    }
  }

  doc.addEventListener("submit", onSubmit);
  doc.addEventListener("click", onClick);
  doc.addEventListener("keydown", onKeydown);
  if (doc.readyState === "loading") {
    doc.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
