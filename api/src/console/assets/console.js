// The console's progressive enhancement: every page works without it.
// - Elements marked data-refresh="SECONDS" are refreshed in place from the same URL.
// - A "select all" checkbox (data-select-all="NAME") toggles every checkbox named NAME.
(function () {
  "use strict";
  function refresh(el) {
    var seconds = parseInt(el.getAttribute("data-refresh"), 10) || 5;
    setTimeout(function () {
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.getElementById(el.id);
          if (fresh) {
            el.replaceWith(fresh);
            if (fresh.hasAttribute("data-refresh")) { refresh(fresh); }
          }
        })
        .catch(function () { refresh(el); });
    }, seconds * 1000);
  }
  document.querySelectorAll("[data-refresh][id]").forEach(refresh);
  document.querySelectorAll("[data-select-all]").forEach(function (box) {
    box.addEventListener("change", function () {
      var name = box.getAttribute("data-select-all");
      document.querySelectorAll('input[type=checkbox][name="' + name + '"]').forEach(function (b) {
        b.checked = box.checked;
      });
    });
  });
})();
