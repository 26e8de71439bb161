"""Reading the tables: figures (:mod:`.plots`), the Markdown summary (:mod:`.summary`), run-vs-reference
comparison (:mod:`.compare`), ``make reproduce`` (:mod:`.reproduce`), ``make promote``
(:mod:`.promote`) and table migrations (:mod:`.migrate`)."""
